"""Every TCP socket Tessera itself listens on is bound to the address its config names: the router's
gRPC and HTTP ports to ``router.host``, the KV transport's rendezvous store and gloo pairs to
``kv_transfer.interface`` (loopback by default); none to every interface.

Sockets are read from /proc (Linux): a process's listening sockets are the LISTEN entries of
/proc/<pid>/net/tcp{,6} whose inode is one of its open file descriptors. Ray opens listening
sockets in the same processes (each worker's and the driver's core-worker gRPC server, on all
interfaces); those are Ray's, told apart by the port Ray reports for an actor, or by opening
ours between two snapshots.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import asdict

import pytest

from cluster.kv_transfer import KVTicket
from cluster.kv_transfer.testing import CacheSpec, EndpointProcess, KVEndpoint, make_meta
from models.media_samples import make_test_image
from cluster.request_types import MediaInput
from tests.conftest import TEST_ENGINE

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads listening sockets from /proc")

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def _address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp{,6} ``local_address`` -> (ip, port); addresses are 32-bit words in host order."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    # gRPC binds an IPv4 address as an IPv6 socket on its mapped form (::ffff:127.0.0.1): the same address
    return getattr(ip, "ipv4_mapped", None) or ip, int(port, 16)


def listening_sockets(pid: int) -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(ip, port) of every TCP socket process ``pid`` has open in the LISTEN state."""
    listeners: dict[str, tuple] = {}
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listeners[fields[9]] = _address(fields[1])
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:[") and target[8:-1] in listeners:
            found.add(listeners[target[8:-1]])
    return found


# -- the KV transport on a configured interface (no cluster) ----------------------------------------
INTERFACE = "127.0.0.2"  # loopback too, but neither the default 127.0.0.1 nor a wildcard


@pytest.mark.timeout(120)
def test_kv_transport_listens_on_the_configured_interface_only():
    spec = CacheSpec(num_layers=2, num_blocks=8)
    before = listening_sockets(os.getpid())
    receiver = KVEndpoint("receiver", "gloo", "decode-x", asdict(spec), host=INTERFACE, timeout_s=20.0)
    try:
        with EndpointProcess("sender", "gloo", "prefill-x", spec, host=INTERFACE, timeout_s=20.0) as sender:
            info = receiver.receiver.prepare_pair("prefill-x")
            assert info["host"] == INTERFACE
            assert sender.call("connect", peer_id="decode-x", info=info)["ok"]
            meta = make_meta(spec, "t-sockets", src=[1, 2], dst=[3, 4])
            sender.request("send", peer_id="decode-x", meta=meta)
            assert receiver.recv(KVTicket("gloo", "prefill-x", "decode-x", meta), 20.0) == meta.num_bytes
            assert sender.reply(30.0)["ok"]
            # the pair stays connected: its gloo sockets are open on both sides now
            ours = listening_sockets(os.getpid()) - before
            theirs = listening_sockets(sender.process.pid)  # a plain child: everything in it is ours
    finally:
        receiver.close()
    assert (ipaddress.ip_address(INTERFACE), info["port"]) in ours  # the rendezvous store
    assert len(ours) >= 2 and theirs, (ours, theirs)  # + a gloo pair listener on each side
    assert {ip for ip, _ in ours | theirs} == {ipaddress.ip_address(INTERFACE)}, (ours, theirs)


# -- a served cluster with the default config ------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_sockets(ray_session, tiny_models):
    """A disaggregated cluster (gloo KV) with its router, and the sockets the router opened: this
    process's listening sockets after the router started, less those before."""
    from cluster.client import TesseraClient
    from cluster.config import ClusterConfig
    from cluster.launch import Cluster
    from router.service import BackgroundRouter

    # gloo, the transport a multi-node cluster uses, so both workers open TCP listeners (the
    # default, auto, takes shm here: the prefill side then listens on no TCP port at all).
    config = ClusterConfig().with_overrides(engine={"model": str(tiny_models["llava-clip-llama"]), **TEST_ENGINE},
                                            router={"grpc_port": 0, "http_port": 0},
                                            kv_transfer={"transport": "gloo"})
    assert config.router.host == "127.0.0.1" and config.kv_transfer.interface == "127.0.0.1"  # the defaults
    cluster = Cluster(config).start()
    try:
        before = listening_sockets(os.getpid())
        router = BackgroundRouter(cluster, serve_http=True).start()
        opened = listening_sockets(os.getpid()) - before
        try:
            with TesseraClient(router.address) as client:  # one request: prefill -> decode over gloo
                client.generate("USER: <image>\nHi ASSISTANT:", [MediaInput(make_test_image(2), "image/png")])
            yield router, opened
        finally:
            router.stop()
    finally:
        cluster.shutdown()


def test_router_listens_on_router_host_only(cluster_sockets):
    router, opened = cluster_sockets
    ports = {int(router.address.rsplit(":", 1)[1]), int(router.http_address.rsplit(":", 1)[1])}
    assert opened == {(LOOPBACK, port) for port in ports}  # gRPC and HTTP (with /metrics), nothing else


def test_workers_listen_on_the_kv_interface_only_beside_rays_own_port(cluster_sockets):
    import ray._private.state

    router, _ = cluster_sockets
    workers = {w.worker_id: w.info.pid for w in router.core.controller.workers()}
    assert {w.split("-")[0] for w in workers} == {"encoder", "prefill", "decode"}
    ray_ports = {a["Pid"]: a["Address"]["Port"] for a in ray._private.state.actors().values()
                 if a.get("State") == "ALIVE"}
    for worker_id, pid in workers.items():
        sockets = listening_sockets(pid)
        rays = {(ip, port) for ip, port in sockets if port == ray_ports[pid]}
        assert rays, f"{worker_id}: Ray's core-worker port {ray_ports[pid]} not found in {sockets}"
        ours = sockets - rays
        assert all(ip == LOOPBACK for ip, _ in ours), f"{worker_id} listens beyond 127.0.0.1: {ours}"
        if worker_id.startswith("decode"):  # the rendezvous store + the gloo pair with the prefill worker
            assert len(ours) >= 2, ours
        if worker_id.startswith("prefill"):  # its side of the gloo pair
            assert ours, ours
