"""Multi-node, for real: a Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``:
a head raylet and a second raylet, each with its own object store and workers), the pools pinned to
nodes by custom resources exactly as ``deploy/configs/multi-node.yaml`` does, and ``tessera serve
--address`` started as a user starts it. The decode node's raylet is then killed with requests in
flight, and brought back.

The one test module that starts a Ray instance of its own (a second cluster beside the suite's
shared one: a single local ``ray.init`` cannot have two raylets). Everything it starts stops at the
end of the module.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.request_types import SamplingParams
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

ARCH = "llava-clip-llama"
HEAD_RESOURCES = {"tessera_encoder": 1, "tessera_prefill": 1}
DECODE_RESOURCES = {"tessera_decode": 1}
PROMPT = "Once upon a time, on a cluster of two nodes"
# Ray notices a dead raylet within ~2 s instead of its default ~30 s.
RAY_SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                     "health_check_failure_threshold": 3}


def pool(resources: dict) -> dict:
    return {"num_workers": 1, "min_workers": 1, "max_workers": 1, "num_cpus": 0.5, "torch_threads": 1,
            "resources": resources}


@pytest.fixture(scope="module")
def two_nodes():
    from ray._private import utils
    from ray.cluster_utils import Cluster

    previous = utils.read_ray_address()  # what `ray start` on this machine left there, if anything
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "resources": HEAD_RESOURCES, "include_dashboard": False,
        "_system_config": RAY_SYSTEM_CONFIG})
    try:
        add_decode_node(cluster)
        cluster.wait_for_nodes()
        [decode_node] = cluster.worker_nodes
        yield cluster, decode_node
    finally:
        stop(cluster, previous)


def stop(cluster, previous_address: str | None) -> None:
    """Every node's processes killed. Not ``Cluster.shutdown``: it resets this process's GCS kv
    client, which the suite's own Ray instance still uses. The address file the head wrote is
    put back as it was (a later ``ray.init()`` with no address would try to join the dead cluster)."""
    from ray._private import utils

    address = cluster.gcs_address  # (gone with the head)
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)
    cluster.remove_node(cluster.head_node, allow_graceful=False)
    if utils.read_ray_address() == address:
        os.remove(utils.get_ray_address_file(None))
        if previous_address:
            utils.write_ray_address(previous_address)


def add_decode_node(cluster) -> None:
    """A decode node (again). Ray gives a new raylet 30 s to register, hard-coded; on a loaded
    2-core machine that can pass: try again."""
    for attempt in range(3):
        try:
            cluster.add_node(num_cpus=1, resources=DECODE_RESOURCES)
            return
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            if attempt == 2:
                raise


def decode_workers(client) -> list[dict]:
    return client.status()["pools"]["decode"]["workers"]


def test_pools_pinned_to_nodes_serve_exactly_and_survive_the_decode_node_dying(two_nodes, tiny_models, tmp_path):
    from benchmarks.servers import TesseraServer, log_tail
    from cluster.client import TesseraClient
    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine

    cluster, decode_node = two_nodes
    engine = {"model": str(tiny_models[ARCH]), "kv_cache_memory_gb": 0.05}
    config = {
        "engine": engine,
        "pools": {"encoder": pool({"tessera_encoder": 1}), "prefill": pool({"tessera_prefill": 1}),
                  "decode": pool({"tessera_decode": 1})},
        "kv_transfer": {"transport": "gloo", "interface": "127.0.0.1", "timeout_s": 10},
        "router": {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0},
        "controller": {"health_check_period_s": 0.5, "health_check_timeout_s": 5.0, "health_check_failures": 2},
    }
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    [want] = ColocatedEngine(EngineConfig(**engine)).generate([(PROMPT, [], greedy)])

    # The benchmarks' server process: `tessera serve --address ... --config ...`, addresses read
    # from its start-up lines, stopped by SIGINT (then harder) at the end.
    serve = TesseraServer("two-nodes", "disaggregated", config, {"router": None}, tmp_path,
                          address=cluster.address).start(timeout_s=300)
    proc = serve.proc
    client = TesseraClient(serve.grpc_address)
    try:
        status = client.status()
        head_id = cluster.head_node.node_id
        on = {p: {w["node_id"] for w in status["pools"][p]["workers"]} for p in ("encoder", "prefill", "decode")}
        assert on == {"encoder": {head_id}, "prefill": {head_id}, "decode": {decode_node.node_id}}
        assert client.generate(PROMPT, [], greedy).token_ids == want.token_ids  # KV crossed the nodes

        # The decode node's raylet dies with requests streaming; no other decode node: they fail fast.
        long = SamplingParams(max_tokens=2000, ignore_eos=True)
        streaming = threading.Semaphore(0)  # released once per stream that has its first tokens

        def stream() -> grpc.StatusCode | None:
            from cluster.client import build_request

            got = 0
            try:
                for resp in client.stream(build_request(PROMPT, [], long)):
                    before, got = got, got + (len(resp.chunk.token_ids) if resp.HasField("chunk") else 0)
                    if before < 2 <= got:
                        streaming.release()
                return None
            except grpc.RpcError as exc:
                return exc.code()

        with ThreadPoolExecutor(3) as threads:
            futures = [threads.submit(stream) for _ in range(3)]
            for _ in futures:
                assert streaming.acquire(timeout=120), "a stream got no tokens"
            killed = time.monotonic()
            cluster.remove_node(decode_node, allow_graceful=False)
            codes = [f.result(60) for f in futures]
            failed_within = time.monotonic() - killed
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 3, codes
        assert failed_within < 15.0, failed_within

        # The node comes back: the pool refills on it and serves exactly again.
        returned = time.monotonic()
        add_decode_node(cluster)
        ready = wait_for(lambda: [w for w in decode_workers(client) if w["state"] == "ready"], 180,
                         "a ready decode worker on the returned node")
        assert len(ready) == 1 and ready[0]["node_id"] not in (head_id, decode_node.node_id)
        print(f"\nstreams failed {failed_within:.1f} s after the raylet was killed; a decode worker was ready "
              f"{time.monotonic() - returned:.1f} s after the node came back")
        assert client.generate(PROMPT, [], greedy).token_ids == want.token_ids
    finally:
        client.close()
        serve.stop()
    assert proc.returncode == 0, log_tail(serve.log_path)
