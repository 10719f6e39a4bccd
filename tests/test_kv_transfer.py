"""KV transfer on CPU: contracts, the fake, gloo and shm between two real processes, Ray between actors.

shm-only behaviour (ring lifetime, host and ring checks, a dying sender): tests/test_kv_transfer_shm.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict

import pytest
import torch

from cluster.kv_transfer import (
    KVTicket,
    KVTransferError,
    KVTransferMeta,
    KVTransferState,
    KVTransferTimeout,
    iter_kv_layers,
    make_kv_receiver,
    make_kv_sender,
    run_kv_transfer,
    testing,
)
from cluster.kv_transfer.local import LocalKVSender
from cluster.kv_transfer.pair_auth import KVPeerRefused
from cluster.kv_transfer.testing import CacheSpec, EndpointProcess, KVEndpoint

SENDER_ID = "prefill-0"
RECEIVER_ID = "decode-0"
SRC_BLOCKS = (3, 17, 5, 30, 0)
DST_BLOCKS = (9, 1, 22, 14, 27)


def make_meta(spec: CacheSpec, transfer_id: str, src=SRC_BLOCKS, dst=DST_BLOCKS, **overrides) -> KVTransferMeta:
    return testing.make_meta(spec, transfer_id, src, dst, **overrides)


assert_landed = testing.assert_blocks_landed


# -- contracts ---------------------------------------------------------------------------------


def test_meta_msgpack_roundtrip():
    meta = make_meta(CacheSpec(dtype="bfloat16"), "t-1")
    data = meta.to_msgpack()
    assert isinstance(data, bytes)
    back = KVTransferMeta.from_msgpack(data)
    assert back == meta
    assert back.src_block_ids == SRC_BLOCKS and back.dst_block_ids == DST_BLOCKS
    assert back.layer_shape == (2, 5, 4, 2, 8)
    assert back.num_bytes == 4 * 2 * 5 * 4 * 2 * 8 * 2  # bf16: 2 bytes
    assert KVTransferMeta.for_cache(
        CacheSpec().make(), request_id="r", transfer_id=7, src_block_ids=[1], dst_block_ids=[2]
    ).transfer_id == "7"


def test_meta_rejects_bad_input():
    spec = CacheSpec()
    with pytest.raises(ValueError):
        make_meta(spec, "t", dst=(1, 2))  # counts differ
    with pytest.raises(ValueError):
        make_meta(spec, "t", dst=(1, 1, 2, 3, 4))  # duplicate destination
    with pytest.raises(ValueError):
        make_meta(spec, "t", dtype="int8")
    with pytest.raises(KVTransferError):
        KVTransferMeta.from_msgpack(b"\x81\xa1x\x01")  # valid msgpack, not a meta


def test_unknown_transport_is_rejected():
    with pytest.raises(ValueError, match="unknown KV transport"):
        make_kv_sender("carrier-pigeon", sender_id="p")


def test_local_fake_transport_and_ticket_checks():
    spec = CacheSpec()
    src_kv, dst_kv = spec.make(), CacheSpec(seed=1).make()
    before = dst_kv.clone()
    sender = make_kv_sender("local", sender_id=SENDER_ID)
    receiver = make_kv_receiver("local", receiver_id=RECEIVER_ID)
    sender.connect(RECEIVER_ID, receiver.prepare_pair(SENDER_ID))
    meta = make_meta(spec, "t-local")

    result, num_bytes = run_kv_transfer(
        sender, RECEIVER_ID, meta, iter_kv_layers(src_kv, meta.src_block_ids),
        start_recv=lambda ticket: receiver.recv(ticket, dst_kv, meta.dst_block_ids),
    )
    assert num_bytes == result.num_bytes == meta.num_bytes
    assert_landed(src_kv, dst_kv, before, SRC_BLOCKS, DST_BLOCKS)
    assert receiver.transfer_state("t-local") is KVTransferState.SUCCESS
    assert sender.stats().num_ok == receiver.stats().num_ok == 1

    with pytest.raises(KVTransferError, match="dst_block_ids"):
        receiver.recv(result.ticket, dst_kv, DST_BLOCKS[::-1])
    wrong_receiver = KVTicket("local", SENDER_ID, "decode-9", meta, result.ticket.payload)
    with pytest.raises(KVTransferError, match="receiver"):
        receiver.recv(wrong_receiver, dst_kv, DST_BLOCKS)
    with pytest.raises(KVTransferError, match="does not fit"):
        receiver.recv(result.ticket, dst_kv.to(torch.float16), DST_BLOCKS)
    with pytest.raises(KVTransferError, match="layer 1"):  # sender checks every layer's shape
        sender.send(RECEIVER_ID, meta, [src_kv[0][:, :5], src_kv[1][:, :4]])
    assert receiver.stats().num_failed == 3


def test_run_kv_transfer_starts_recv_first_for_rendezvous_transports():
    calls = []

    class FakeRendezvousSender(LocalKVSender):
        recv_during_send = True

        def send(self, peer_id, meta, layers, timeout_s=None):
            calls.append("send")
            return super().send(peer_id, meta, layers, timeout_s)

    sender = FakeRendezvousSender(sender_id="x")
    spec = CacheSpec()
    meta = make_meta(spec, "t-order")
    _, handle = run_kv_transfer(sender, "d", meta, iter_kv_layers(spec.make(), SRC_BLOCKS),
                                start_recv=lambda ticket: calls.append("recv") or ticket)
    assert calls == ["recv", "send"]
    assert handle.meta == meta and handle.sender_id == "x" and handle.receiver_id == "d"


# -- rendezvous transports (gloo, shm) between two processes -----------------------------------


@pytest.fixture(scope="module", params=[(t, d) for t in ("gloo", "shm") for d in ("float32", "bfloat16")],
                ids=lambda p: "-".join(p))
def rdv_sender(request):
    """A prefill-side sender of a rendezvous transport in a spawned child with its own seeded cache."""
    transport, dtype = request.param
    spec = CacheSpec(dtype=dtype, seed=0)
    with EndpointProcess("sender", transport, SENDER_ID, spec, timeout_s=10.0) as proc:
        proc.spec = spec
        yield proc


@pytest.fixture
def rdv_receiver(rdv_sender):
    """A fresh decode-side receiver in this process (a new store: the sender re-connects)."""
    spec = CacheSpec(dtype=rdv_sender.spec.dtype, seed=1)
    endpoint = KVEndpoint("receiver", rdv_sender.transport, RECEIVER_ID, asdict(spec), timeout_s=10.0)
    assert rdv_sender.call("connect", peer_id=RECEIVER_ID, info=endpoint.receiver.prepare_pair(SENDER_ID))["ok"]
    yield endpoint
    endpoint.close()


def ticket_of(sender: EndpointProcess, meta: KVTransferMeta) -> KVTicket:
    return KVTicket(sender.transport, SENDER_ID, RECEIVER_ID, meta)


def transfer(sender: EndpointProcess, receiver: KVEndpoint, meta: KVTransferMeta, recv_timeout_s=10.0, **send_opts):
    """Sender in the child and receiver here, concurrently. Returns (send reply, recv bytes or error)."""
    sender.request("send", peer_id=RECEIVER_ID, meta=meta, **send_opts)
    try:
        got = receiver.recv(ticket_of(sender, meta), recv_timeout_s)
    except KVTransferError as e:
        got = e
    return sender.reply(30.0), got


@pytest.mark.timeout(60)
def test_rendezvous_moves_blocks_exactly(rdv_sender, rdv_receiver):
    before = rdv_receiver.kv.clone()
    meta = make_meta(rdv_sender.spec, "t-exact")
    reply, got = transfer(rdv_sender, rdv_receiver, meta)
    assert reply["ok"], reply
    assert got == reply["num_bytes"] == meta.num_bytes
    assert_landed(rdv_sender.spec.make(), rdv_receiver.kv, before, SRC_BLOCKS, DST_BLOCKS)
    assert rdv_receiver.receiver.transfer_state("t-exact") is KVTransferState.SUCCESS


@pytest.mark.timeout(60)
def test_rendezvous_consecutive_transfers_reuse_the_pair(rdv_sender, rdv_receiver):
    before = rdv_receiver.kv.clone()
    setups_before = rdv_sender.call("stats")["stats"]["num_pair_setups"]
    for i, (src, dst) in enumerate([((1, 2), (4, 5)), ((6, 7, 8), (10, 11, 12))]):
        reply, got = transfer(rdv_sender, rdv_receiver, make_meta(rdv_sender.spec, f"t-reuse-{i}", src, dst))
        assert reply["ok"] and got == reply["num_bytes"]
    assert_landed(rdv_sender.spec.make(), rdv_receiver.kv, before, (1, 2, 6, 7, 8), (4, 5, 10, 11, 12))
    stats = rdv_receiver.stats()
    assert stats["num_pair_setups"] == 1 and stats["num_ok"] == 2 and stats["num_pairs"] == 1
    assert rdv_sender.call("stats")["stats"]["num_pair_setups"] == setups_before + 1


@pytest.mark.timeout(60)
def test_rendezvous_recv_without_sender_times_out_then_next_transfer_works(rdv_sender, rdv_receiver):
    spec = rdv_sender.spec
    ticket = ticket_of(rdv_sender, make_meta(spec, "t-nobody"))
    t0 = time.monotonic()
    with pytest.raises(KVTransferTimeout):
        rdv_receiver.recv(ticket, timeout_s=1.0)
    assert time.monotonic() - t0 < 3.0
    assert rdv_receiver.receiver.transfer_state("t-nobody") is KVTransferState.FAILED

    before = rdv_receiver.kv.clone()
    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-after-timeout"))
    assert reply["ok"] and got == reply["num_bytes"]
    assert_landed(spec.make(), rdv_receiver.kv, before, SRC_BLOCKS, DST_BLOCKS)
    assert rdv_receiver.stats()["num_failed"] == 1


@pytest.mark.timeout(60)
def test_rendezvous_stalled_sender_fails_both_sides_and_pair_is_recreated(rdv_sender, rdv_receiver):
    spec = rdv_sender.spec
    # Prefill stalls after layer 1 for longer than the receiver waits: the receiver times out
    # mid-transfer and drops the pair; the sender then fails too (peer gone or no ack).
    meta = make_meta(spec, "t-stall")
    t0 = time.monotonic()
    reply, got = transfer(rdv_sender, rdv_receiver, meta, recv_timeout_s=1.5,
                          stall_after=1, stall_s=2.5, timeout_s=5.0)
    assert isinstance(got, KVTransferTimeout) and time.monotonic() - t0 < 8.0
    assert not reply["ok"], reply
    assert rdv_receiver.stats()["num_pairs"] == 0

    before = rdv_receiver.kv.clone()
    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-after-stall"))
    assert reply["ok"] and got == reply["num_bytes"]
    assert_landed(spec.make(), rdv_receiver.kv, before, SRC_BLOCKS, DST_BLOCKS)
    assert rdv_receiver.stats()["num_pair_setups"] == 2


@pytest.mark.timeout(60)
def test_rendezvous_header_mismatch_fails_cleanly(rdv_sender, rdv_receiver):
    spec = rdv_sender.spec
    before = rdv_receiver.kv.clone()
    sent = make_meta(spec, "t-mismatch")
    expected = make_meta(spec, "t-mismatch", dst=(2, 4, 6, 8, 10))  # same id, other reservation
    rdv_sender.request("send", peer_id=RECEIVER_ID, meta=sent, timeout_s=10.0)
    with pytest.raises(KVTransferError, match="header mismatch"):
        rdv_receiver.recv(ticket_of(rdv_sender, expected), 10.0)
    reply = rdv_sender.reply(30.0)
    assert not reply["ok"] and reply["elapsed_s"] < 5.0  # the receiver's abort reached it at once
    assert torch.equal(rdv_receiver.kv, before)  # nothing landed

    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-after-mismatch"))
    assert reply["ok"] and got == reply["num_bytes"]


@pytest.mark.timeout(60)
def test_rendezvous_prefill_failure_mid_transfer_fails_receiver_fast(rdv_sender, rdv_receiver):
    spec = rdv_sender.spec
    t0 = time.monotonic()
    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-crash"), recv_timeout_s=10.0, fail_after=2)
    assert not reply["ok"] and "PrefillCrashed" in reply["error"]
    assert isinstance(got, KVTransferError) and not isinstance(got, KVTransferTimeout)
    assert time.monotonic() - t0 < 5.0

    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-after-crash"))
    assert reply["ok"] and got == reply["num_bytes"]


@pytest.mark.timeout(60)
def test_rendezvous_sender_gives_up_and_late_receiver_fails_fast(rdv_sender, rdv_receiver):
    """No recv comes in time: the sender times out setting up the pair and leaves word for the
    receiver, whose late recv then fails at once instead of waiting out its deadline."""
    spec = rdv_sender.spec
    rdv_receiver.receiver.abort()  # force a pair setup, which needs the receiver
    meta = make_meta(spec, "t-late")
    reply = rdv_sender.call("send", peer_id=RECEIVER_ID, meta=meta, timeout_s=1.0)
    assert not reply["ok"] and reply["timeout"], reply
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="sender gave up"):
        rdv_receiver.recv(ticket_of(rdv_sender, meta), 10.0)
    assert time.monotonic() - t0 < 2.0

    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-after-late"))
    assert reply["ok"] and got == reply["num_bytes"]


@pytest.mark.timeout(60)
def test_rendezvous_receiver_threads_started_out_of_order(rdv_sender, rdv_receiver):
    """Two transfers queued on one pair; the decode side starts B's recv before A's."""
    spec = rdv_sender.spec
    metas = [make_meta(spec, "t-A", (1, 2), (3, 4)), make_meta(spec, "t-B", (5, 6, 7), (8, 9, 10))]
    results: dict[str, object] = {}

    def recv(meta):
        try:
            results[meta.transfer_id] = rdv_receiver.recv(ticket_of(rdv_sender, meta), 15.0)
        except KVTransferError as e:
            results[meta.transfer_id] = e

    before = rdv_receiver.kv.clone()
    threads = [threading.Thread(target=recv, args=(m,)) for m in reversed(metas)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for meta in metas:  # the child runs them one after the other, A first
        rdv_sender.request("send", peer_id=RECEIVER_ID, meta=meta)
    replies = [rdv_sender.reply(30.0) for _ in metas]
    for t in threads:
        t.join(20.0)
    assert all(r["ok"] for r in replies), replies
    assert results == {m.transfer_id: m.num_bytes for m in metas}
    assert_landed(spec.make(), rdv_receiver.kv, before, (1, 2, 5, 6, 7), (3, 4, 8, 9, 10))


@pytest.mark.timeout(60)
def test_rendezvous_layer_wise_each_layer_lands_as_the_step_writes_it(rdv_sender, rdv_receiver):
    """The sender reads layer l once a (played) prefill step has written it, one layer every
    0.3 s: layer 0 is in the receiver's blocks while the step still computes the last layers."""
    spec = rdv_sender.spec
    src = spec.make()
    before = rdv_receiver.kv.clone()
    meta = make_meta(spec, "t-layerwise")
    dst = list(DST_BLOCKS)
    landed: dict[int, float] = {}
    result: dict[str, object] = {}

    def recv():
        result["bytes"] = rdv_receiver.recv(ticket_of(rdv_sender, meta), 15.0)
        result["done"] = time.monotonic()

    thread = threading.Thread(target=recv)
    thread.start()
    rdv_sender.request("send", peer_id=RECEIVER_ID, meta=meta, timeout_s=15.0, gate_every_s=0.3)
    while thread.is_alive() or len(landed) < spec.num_layers:
        for layer in range(spec.num_layers):
            if layer not in landed and torch.equal(rdv_receiver.kv[layer][:, dst], src[layer][:, list(SRC_BLOCKS)]):
                landed[layer] = time.monotonic()
        if not thread.is_alive() and len(landed) < spec.num_layers:
            break
        time.sleep(0.005)
    thread.join(10.0)
    assert rdv_sender.reply(30.0)["ok"] and result["bytes"] == meta.num_bytes
    assert_landed(src, rdv_receiver.kv, before, SRC_BLOCKS, DST_BLOCKS)
    assert sorted(landed, key=landed.get) == list(range(spec.num_layers))  # in order, one by one
    assert result["done"] - landed[0] > 0.5  # layer 0 was there ~3 layer-times before the end


@pytest.mark.timeout(60)
def test_rendezvous_prefill_step_failing_between_layers_fails_both_ends_fast(rdv_sender, rdv_receiver):
    """The step fails after writing 2 layers: the transfer waiting for layer 2 aborts at once
    on both ends (not after its deadline), and the pair serves the next transfer."""
    spec = rdv_sender.spec
    t0 = time.monotonic()
    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-step-fails"), recv_timeout_s=10.0,
                          timeout_s=10.0, gate_every_s=0.1, gate_fail_after=2)
    assert not reply["ok"] and "prefill step failed" in reply["error"], reply
    assert isinstance(got, KVTransferError) and not isinstance(got, KVTransferTimeout), got
    assert time.monotonic() - t0 < 5.0

    before = rdv_receiver.kv.clone()
    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-after-step-failed"))
    assert reply["ok"] and got == reply["num_bytes"]
    assert_landed(spec.make(), rdv_receiver.kv, before, SRC_BLOCKS, DST_BLOCKS)


@pytest.mark.timeout(60)
def test_rendezvous_prefill_step_stalling_between_layers_times_out_both_ends(rdv_sender, rdv_receiver):
    """The step stops after 2 layers and never comes back: the sender gives up at its deadline
    (1.5 s), the receiver (5 s) no later than its own, and the pair recovers."""
    spec = rdv_sender.spec
    t0 = time.monotonic()
    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-step-stalls"), recv_timeout_s=5.0,
                          timeout_s=1.5, gate_every_s=0.1, gate_stall_after=2)
    assert not reply["ok"] and reply["timeout"] and "layer 2" in reply["error"], reply
    assert isinstance(got, KVTransferError), got
    assert time.monotonic() - t0 < 8.0

    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-after-step-stalled"))
    assert reply["ok"] and got == reply["num_bytes"]


@pytest.mark.timeout(60)
def test_rendezvous_stranger_without_the_pair_key_is_refused_and_nothing_lands(rdv_sender, rdv_receiver):
    """A sender that reaches the receiver's store and claims a real sender's id, but does not
    hold the pair's key (it never got it through Ray), is refused before a byte of KV lands."""
    spec = rdv_sender.spec
    info = rdv_receiver.pair_info(SENDER_ID)
    stranger = {**info, "pair_key": bytes(32)}
    assert rdv_sender.call("connect", peer_id=RECEIVER_ID, info=stranger)["ok"]
    before = rdv_receiver.kv.clone()
    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-stranger"))
    assert isinstance(got, KVPeerRefused) and "failed authentication" in str(got), got
    assert not reply["ok"] and "failed authentication" in reply["error"], reply
    assert torch.equal(rdv_receiver.kv, before)  # nothing accepted
    assert rdv_receiver.stats()["num_pairs"] == 0

    assert rdv_sender.call("connect", peer_id=RECEIVER_ID, info=info)["ok"]  # the real one, through Ray
    reply, got = transfer(rdv_sender, rdv_receiver, make_meta(spec, "t-after-stranger"))
    assert reply["ok"] and got == reply["num_bytes"]
    assert_landed(spec.make(), rdv_receiver.kv, before, SRC_BLOCKS, DST_BLOCKS)


@pytest.mark.timeout(60)
def test_rendezvous_sender_refuses_an_impostor_receiver(rdv_sender, rdv_receiver):
    """The other way round: the pair info points at another receiver of the same id (an
    address taken over): it cannot prove it holds the key, and the sender sends it no KV."""
    spec = rdv_sender.spec
    impostor = KVEndpoint("receiver", rdv_sender.transport, RECEIVER_ID, asdict(CacheSpec(dtype=spec.dtype, seed=2)),
                          timeout_s=10.0)
    try:
        info = {**impostor.pair_info(SENDER_ID), "pair_key": rdv_receiver.pair_info(SENDER_ID)["pair_key"]}
        assert rdv_sender.call("connect", peer_id=RECEIVER_ID, info=info)["ok"]
        before = impostor.kv.clone()
        reply, got = transfer(rdv_sender, impostor, make_meta(spec, "t-impostor"))
        assert not reply["ok"] and "the receiver of pair" in reply["error"], reply
        assert isinstance(got, KVPeerRefused), got
        assert torch.equal(impostor.kv, before)
    finally:
        impostor.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["gloo", "shm"])
@pytest.mark.parametrize("lanes", [4, 1])
def test_a_short_transfer_does_not_queue_behind_a_long_one_on_the_same_pair(transport, lanes):
    """A long transfer whose prefill step writes a layer every 0.4 s holds one lane for ~1.6 s.
    With lanes left, a one-block transfer to the same receiver takes its own (a second
    communicator) and lands at once; with one lane per pair it waits for the long one."""
    spec = CacheSpec(num_blocks=40)
    src, dst = spec.make(), CacheSpec(num_blocks=40, seed=1).make()
    before = dst.clone()
    sender = make_kv_sender(transport, sender_id=SENDER_ID, timeout_s=20.0, max_lanes=lanes)
    receiver = make_kv_receiver(transport, receiver_id=RECEIVER_ID, timeout_s=20.0)
    results: dict[str, object] = {}

    def run(name, meta, layers):
        def recv(ticket):
            thread = threading.Thread(target=lambda: results.setdefault(
                f"{name}-recv", receiver.recv(ticket, dst, meta.dst_block_ids)))
            thread.start()
            return thread

        t0 = time.monotonic()
        sent, thread = run_kv_transfer(sender, RECEIVER_ID, meta, layers, recv)
        thread.join(20.0)
        results[name] = (sent.num_bytes, time.monotonic() - t0)

    try:
        sender.connect(RECEIVER_ID, receiver.prepare_pair(SENDER_ID))
        run("warm", make_meta(spec, "t-warm", (30,), (38,)), iter_kv_layers(src, (30,)))  # builds lane 0
        long_meta = make_meta(spec, "t-long", range(0, 16), range(16, 32))
        gate = testing.gated_compute(spec.num_layers, 0.4)
        long = threading.Thread(target=run, args=("long", long_meta, iter_kv_layers(src, range(0, 16), gate, 20.0)))
        long.start()
        while sender.transfer_state("t-long") is not KVTransferState.TRANSFERRING:
            time.sleep(0.01)
        short_meta = make_meta(spec, "t-short", (35,), (36,))
        run("short", short_meta, iter_kv_layers(src, (35,)))
        long_running = long.is_alive()
        long.join(20.0)
        short_s, long_s = results["short"][1], results["long"][1]
        assert results["short"][0] == results["short-recv"] == short_meta.num_bytes
        assert results["long"][0] == results["long-recv"] == long_meta.num_bytes
        assert_landed(src, dst, before, (30, *range(0, 16), 35), (38, *range(16, 32), 36))
        if lanes > 1:
            assert long_running and short_s < 0.5, (short_s, long_s)
            assert sender.stats().num_pair_setups == 2 == receiver.stats().num_pair_setups  # a second lane
        else:
            assert not long_running and short_s > 0.6, (short_s, long_s)  # it waited for the long one
            assert sender.stats().num_pair_setups == 1
    finally:
        sender.close()
        receiver.close()


# -- Ray object store between two actors ----------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ray_transport_between_actors(ray_session, dtype):
    """Uses the session's shared Ray instance (tests/conftest.py)."""
    ray = ray_session
    Endpoint = ray.remote(num_cpus=0)(KVEndpoint)
    src_spec, dst_spec = CacheSpec(dtype=dtype, seed=0), CacheSpec(dtype=dtype, seed=1)
    prefill = Endpoint.remote("sender", "ray", SENDER_ID, asdict(src_spec))
    decode = Endpoint.remote("receiver", "ray", RECEIVER_ID, asdict(dst_spec))
    ray.get(prefill.connect.remote(RECEIVER_ID, ray.get(decode.pair_info.remote(SENDER_ID))))

    meta = make_meta(src_spec, f"t-ray-{dtype}")
    result = ray.get(prefill.send.remote(RECEIVER_ID, meta), timeout=60)
    assert len(result.ticket.payload) == meta.num_layers
    assert ray.get(decode.recv.remote(result.ticket, 30.0), timeout=60) == result.num_bytes == meta.num_bytes

    got = ray.get(decode.blocks.remote(range(dst_spec.num_blocks)))
    assert_landed(src_spec.make(), got, dst_spec.make(), SRC_BLOCKS, DST_BLOCKS)
    assert ray.get(decode.stats.remote())["num_ok"] == 1
    for actor in (prefill, decode):
        ray.kill(actor)


# -- auto: shm to a receiver on this host, gloo to one elsewhere -------------------------------


@pytest.mark.timeout(120)
def test_auto_transport_picks_shm_on_this_host_and_gloo_across_hosts():
    spec = CacheSpec(dtype="float32", seed=0)
    with EndpointProcess("sender", "auto", SENDER_ID, spec, timeout_s=10.0) as sender:
        receiver = KVEndpoint("receiver", "auto", RECEIVER_ID, asdict(CacheSpec(dtype="float32", seed=1)),
                              timeout_s=10.0)
        try:
            info = receiver.receiver.prepare_pair(SENDER_ID)
            assert info["transport"] == "auto" and {"shm", "gloo"} <= set(info)
            # A receiver that reports another host gets gloo; the same one on this host gets shm.
            for host_id, used in ((f"{info['host_id']}-elsewhere", "gloo"), (info["host_id"], "shm")):
                assert sender.call("connect", peer_id=RECEIVER_ID, info={**info, "host_id": host_id})["ok"]
                before = receiver.kv.clone()
                meta = make_meta(spec, f"t-auto-{used}")
                sender.request("send", peer_id=RECEIVER_ID, meta=meta)
                got = receiver.recv(KVTicket(used, SENDER_ID, RECEIVER_ID, meta), 10.0)
                reply = sender.reply(30.0)
                assert reply["ok"], reply
                assert got == meta.num_bytes
                assert_landed(spec.make(), receiver.kv, before, SRC_BLOCKS, DST_BLOCKS)
                inner = getattr(receiver.receiver, used)
                assert inner.transfer_state(f"t-auto-{used}") is KVTransferState.SUCCESS
            stats = receiver.stats()
            assert stats["num_ok"] == 2
            with pytest.raises(KVTransferError, match="auto receiver takes shm or gloo"):
                receiver.recv(KVTicket("ray", SENDER_ID, RECEIVER_ID, make_meta(spec, "t-auto-bad")), 1.0)
        finally:
            receiver.close()


def test_auto_sender_refuses_other_transports_info():
    sender = make_kv_sender("auto", sender_id=SENDER_ID, timeout_s=1.0)
    try:
        with pytest.raises(KVTransferError, match="not 'auto'"):
            sender.connect(RECEIVER_ID, {"transport": "gloo", "host": "127.0.0.1", "port": 1})
        assert not sender.is_connected(RECEIVER_ID)
    finally:
        sender.close()
