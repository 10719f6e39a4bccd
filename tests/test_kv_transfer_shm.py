"""The shm KV transport's own behaviour: the chunk plan, both send paths, host and ring checks,
and that no ring outlives its pair on any path (success, timeout, stall, crash, abort, a dying
sender, close). The rendezvous protocol itself (timeouts, header mismatch, recovery, ordering)
runs for shm as for gloo in tests/test_kv_transfer.py."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict

import pytest
import torch

from cluster.kv_transfer import (
    KVTicket,
    KVTransferError,
    KVTransferTimeout,
    iter_kv_layers,
    make_kv_receiver,
    make_kv_sender,
    run_kv_transfer,
    shm,
)
from cluster.kv_transfer.layout import BlockRuns
from cluster.kv_transfer.testing import (
    CacheSpec,
    EndpointProcess,
    KVEndpoint,
    assert_blocks_landed,
    make_meta,
    scripted_layers,
    shm_rings_held,
)

SENDER_ID = "prefill-0"
RECEIVER_ID = "decode-0"
SRC_BLOCKS = tuple(range(3, 43))
DST_BLOCKS = tuple(range(63, 23, -1))
SMALL_RING = {"slot_bytes": 4096, "num_slots": 2}  # 16 rows of CacheSpec() per slot: many chunks, wrapping


def no_dev_shm_files() -> bool:
    return not [name for name in os.listdir("/dev/shm") if "tessera" in name]


class InProcessPair:
    """Sender and receiver in this process, the receiver's recv in a thread (as the decode actor)."""

    def __init__(self, spec: CacheSpec, sender_opts=None, receiver_opts=None):
        self.spec = spec
        self.src, self.dst = spec.make(), CacheSpec(**{**asdict(spec), "seed": 1}).make()
        self.sender = make_kv_sender("shm", sender_id=SENDER_ID, timeout_s=10.0, **(sender_opts or {}))
        self.receiver = make_kv_receiver("shm", receiver_id=RECEIVER_ID, timeout_s=10.0, **(receiver_opts or {}))
        self.sender.connect(RECEIVER_ID, self.receiver.prepare_pair(SENDER_ID))

    def transfer(self, meta, layers, recv_timeout_s: float = 10.0):
        """Returns (send result or error, recv bytes or error)."""
        got: dict[str, object] = {}
        threads: list[threading.Thread] = []

        def recv(ticket):
            try:
                got["recv"] = self.receiver.recv(ticket, self.dst, meta.dst_block_ids, recv_timeout_s)
            except KVTransferError as e:
                got["recv"] = e

        def start(ticket):
            threads.append(threading.Thread(target=recv, args=(ticket,)))
            threads[-1].start()

        try:
            sent, _ = run_kv_transfer(self.sender, RECEIVER_ID, meta, layers, start)
        except KVTransferError as e:
            sent = e
        for thread in threads:
            thread.join(20.0)
        return sent, got.get("recv")

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


@pytest.fixture(params=["float32", "bfloat16"])
def pair(request):
    p = InProcessPair(CacheSpec(num_blocks=64, dtype=request.param), sender_opts=SMALL_RING)
    yield p
    p.close()
    assert shm_rings_held() == 0 and no_dev_shm_files()


def test_chunk_plan_covers_every_block_once():
    spec = CacheSpec(num_blocks=64)
    meta = make_meta(spec, "t-plan", SRC_BLOCKS, DST_BLOCKS)
    row = shm.row_bytes(meta)
    plan = shm.chunk_plan(meta, 4096)
    seen = []
    for pieces in plan:
        assert pieces, "no empty chunk"
        end = 0
        for piece in pieces:
            assert piece.offset == end and piece.start < piece.stop  # packed, in order, no overlap
            end = piece.offset + (piece.stop - piece.start) * row
            seen += [(piece.layer, piece.half, b) for b in range(piece.start, piece.stop)]
        assert end <= 4096
    assert seen == [(l, h, b) for l in range(spec.num_layers) for h in (0, 1) for b in range(len(SRC_BLOCKS))]
    per_layer = 2 * len(SRC_BLOCKS) * row  # a chunk never spans two layers
    assert len(plan) == spec.num_layers * -(-per_layer // 4096)
    assert all(len({p.layer for p in pieces}) == 1 for pieces in plan)
    with pytest.raises(KVTransferError, match="more than a ring slot"):
        shm.chunk_plan(make_meta(CacheSpec(head_dim=1024), "t-big", (0,), (1,)), 4096)


def test_block_runs():
    runs = BlockRuns([3, 4, 5, 9, 12, 13, 13, 2])
    assert runs.within(0, 8) == [(0, 3, 3), (3, 9, 1), (4, 12, 2), (6, 13, 1), (7, 2, 1)]
    assert runs.within(1, 5) == [(1, 4, 2), (3, 9, 1), (4, 12, 1)]
    assert BlockRuns([7]).within(0, 1) == [(0, 7, 1)]


def test_round_trip_gathering_directly_and_layer_by_layer(pair):
    """Through a 2-slot ring of 4 KiB (20 chunks): from `iter_kv_layers` (gathered straight into
    the slots; source blocks in runs, or scattered) and from a list of layer tensors. The
    destination blocks run backwards, so they are scattered one by one."""
    before = pair.dst.clone()
    scattered = tuple(range(0, 40, 2)) + tuple(range(41, 61))
    cases = {"direct": (SRC_BLOCKS, True), "direct-scattered": (scattered, True), "by-layer": (SRC_BLOCKS, False)}
    for name, (src_blocks, direct) in cases.items():
        layers = iter_kv_layers(pair.src, src_blocks)
        layers = layers if direct else list(layers)
        meta = make_meta(pair.spec, f"t-{name}", src_blocks, DST_BLOCKS)
        assert shm._can_gather_directly(meta, layers) is direct
        sent, got = pair.transfer(meta, layers)
        assert got == sent.num_bytes == meta.num_bytes, (name, sent, got)
        assert_blocks_landed(pair.src, pair.dst, before, src_blocks, DST_BLOCKS)
        pair.dst.copy_(before)
    assert pair.receiver.stats().num_pair_setups == 1 and pair.receiver.stats().num_ok == 3
    assert shm_rings_held() == 1  # the pair's one ring (mapped by both ends, here one process)


def test_round_trip_into_a_cache_numpy_cannot_view(pair):
    """A non-contiguous receiver cache takes the plain `scatter_kv_blocks` path."""
    shape = pair.dst.shape
    strided = torch.zeros(shape[0], shape[2], 2, *shape[3:], dtype=pair.dst.dtype).transpose(1, 2)
    strided.copy_(pair.dst)
    assert not strided.is_contiguous()
    pair.dst = strided
    before = strided.clone()
    meta = make_meta(pair.spec, "t-strided", SRC_BLOCKS, DST_BLOCKS)
    sent, got = pair.transfer(meta, iter_kv_layers(pair.src, SRC_BLOCKS))
    assert got == sent.num_bytes == meta.num_bytes
    assert_blocks_landed(pair.src, strided, before, SRC_BLOCKS, DST_BLOCKS)


def test_wrong_layer_count_or_shape_fails_both_ends(pair):
    meta = make_meta(pair.spec, "t-short", SRC_BLOCKS, DST_BLOCKS)
    layers = list(iter_kv_layers(pair.src, SRC_BLOCKS))
    sent, got = pair.transfer(meta, layers[:-1])
    assert isinstance(sent, KVTransferError) and "layers given" in str(sent)
    assert isinstance(got, KVTransferError) and not isinstance(got, KVTransferTimeout)
    bad = layers[:1] + [layers[1][:, :-1]] + layers[2:]
    sent, got = pair.transfer(make_meta(pair.spec, "t-shape", SRC_BLOCKS, DST_BLOCKS), bad)
    assert isinstance(sent, KVTransferError) and "layer 1" in str(sent)
    assert isinstance(got, KVTransferError)
    assert shm_rings_held() == 0  # both ends dropped the pair


def test_config_selects_shm_for_the_workers():
    from cluster.config import ClusterConfig
    from cluster.worker_base import make_kv_endpoint

    kv = ClusterConfig().with_overrides(kv_transfer={"transport": "shm"}).kv_transfer
    opts = {"timeout_s": kv.timeout_s, "host": kv.interface, "device": "cpu"}
    sender = make_kv_endpoint("sender", kv.transport, "p", **opts)
    receiver = make_kv_endpoint("receiver", kv.transport, "d", **opts)
    try:
        assert isinstance(sender, shm.ShmKVSender) and isinstance(receiver, shm.ShmKVReceiver)
        assert receiver.endpoint_info()["host"] == "127.0.0.1"  # same host: the store stays on loopback
    finally:
        sender.close()
        receiver.close()


def test_connect_refuses_a_receiver_on_another_host():
    receiver = make_kv_receiver("shm", receiver_id=RECEIVER_ID)
    sender = make_kv_sender("shm", sender_id=SENDER_ID)
    try:
        info = receiver.prepare_pair(SENDER_ID)
        assert info["host_id"] == shm.host_identity()
        with pytest.raises(KVTransferError, match="one host.*use kv_transfer.transport gloo"):
            sender.connect(RECEIVER_ID, {**info, "host_id": "other-node/5f0c0ffe"})
        with pytest.raises(KVTransferError, match="one host"):
            sender.connect(RECEIVER_ID, {k: v for k, v in info.items() if k != "host_id"})
        assert not sender.is_connected(RECEIVER_ID)
    finally:
        sender.close()
        receiver.close()


def test_receiver_refuses_a_ring_over_its_limit():
    p = InProcessPair(CacheSpec(num_blocks=64), sender_opts={"slot_bytes": 8192, "num_slots": 4},
                      receiver_opts={"max_ring_bytes": 16384})
    try:
        meta = make_meta(p.spec, "t-big-ring", SRC_BLOCKS, DST_BLOCKS)
        sent, got = p.transfer(meta, iter_kv_layers(p.src, SRC_BLOCKS))
        assert isinstance(got, KVTransferError) and "ring of 4 x 8192 bytes refused" in str(got)
        assert isinstance(sent, KVTransferError)
        assert shm_rings_held() == 0
    finally:
        p.close()


@pytest.mark.parametrize("ring_fault", ["unsealed", "smaller than declared"])
def test_receiver_refuses_a_ring_it_cannot_trust(monkeypatch, ring_fault):
    """A ring that could shrink under the receiver's mapping (SIGBUS), or whose size is not the
    declared geometry, is never mapped."""

    def bad_ring(num_bytes):
        fd = os.memfd_create(shm.RING_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, num_bytes if ring_fault == "unsealed" else num_bytes // 2)
        if ring_fault != "unsealed":
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shm._SEALS)
        return fd, torch.zeros(0, dtype=torch.uint8)

    monkeypatch.setattr(shm, "_create_ring", bad_ring)
    p = InProcessPair(CacheSpec(num_blocks=64), sender_opts=SMALL_RING)
    try:
        meta = make_meta(p.spec, "t-bad-ring", SRC_BLOCKS, DST_BLOCKS)
        sent, got = p.transfer(meta, iter_kv_layers(p.src, SRC_BLOCKS))
        assert isinstance(got, KVTransferError) and "ring descriptor refused" in str(got)
        assert isinstance(sent, KVTransferError)
        assert shm_rings_held() == 0
    finally:
        p.close()


def test_ticket_that_does_not_fit_the_receivers_cache_is_rejected():
    receiver = make_kv_receiver("shm", receiver_id=RECEIVER_ID)
    try:
        meta = make_meta(CacheSpec(head_dim=16), "t-fit", (1, 2), (3, 4))  # the receiver's cache has head_dim 8
        with pytest.raises(KVTransferError, match="does not fit"):
            receiver.recv(KVTicket("shm", SENDER_ID, RECEIVER_ID, meta), CacheSpec().make(), (3, 4), 1.0)
        meta = make_meta(CacheSpec(), "t-range", (1, 2), (3, 99))
        with pytest.raises(KVTransferError, match="out of range"):
            receiver.recv(KVTicket("shm", SENDER_ID, RECEIVER_ID, meta), CacheSpec().make(), (3, 99), 1.0)
    finally:
        receiver.close()


def test_sender_abort_mid_transfer_fails_both_ends_fast(pair):
    meta = make_meta(pair.spec, "t-abort", SRC_BLOCKS, DST_BLOCKS)
    layers = scripted_layers(iter_kv_layers(pair.src, SRC_BLOCKS), stall_after=2, stall_s=1.5)
    threading.Timer(0.5, pair.sender.abort, args=(RECEIVER_ID,)).start()
    t0 = time.monotonic()
    sent, got = pair.transfer(meta, layers, recv_timeout_s=10.0)
    assert isinstance(got, KVTransferError) and not isinstance(got, KVTransferTimeout), got
    assert isinstance(sent, KVTransferError)
    assert time.monotonic() - t0 < 5.0
    assert shm_rings_held() == 0

    before = pair.dst.clone()  # the next transfer builds a new pair
    sent, got = pair.transfer(make_meta(pair.spec, "t-after-abort", SRC_BLOCKS, DST_BLOCKS),
                              iter_kv_layers(pair.src, SRC_BLOCKS))
    assert got == sent.num_bytes
    assert_blocks_landed(pair.src, pair.dst, before, SRC_BLOCKS, DST_BLOCKS)
    assert pair.receiver.stats().num_pair_setups == 2


# -- rings never outlive their pair, in either process ------------------------------------------


@pytest.fixture
def child_sender():
    with EndpointProcess("sender", "shm", SENDER_ID, CacheSpec(), timeout_s=10.0) as proc:
        yield proc


@pytest.mark.timeout(120)
def test_no_ring_outlives_its_pair_on_any_path(child_sender):
    spec = CacheSpec()
    receiver = KVEndpoint("receiver", "shm", RECEIVER_ID, asdict(CacheSpec(seed=1)), timeout_s=10.0)
    child = child_sender.process.pid
    assert child_sender.call("connect", peer_id=RECEIVER_ID, info=receiver.pair_info(SENDER_ID))["ok"]
    metas = (make_meta(spec, f"t-{i}", (1, 2, 3), (4, 5, 6)) for i in range(100))

    def transfer(recv_timeout_s=10.0, **script):
        meta = next(metas)
        child_sender.request("send", peer_id=RECEIVER_ID, meta=meta, timeout_s=10.0, **script)
        try:
            got = receiver.recv(KVTicket("shm", SENDER_ID, RECEIVER_ID, meta), recv_timeout_s)
        except KVTransferError as e:
            got = e
        return child_sender.reply(30.0), got

    def rings():
        return shm_rings_held(), shm_rings_held(child)

    try:
        with pytest.raises(KVTransferTimeout):  # no sender: nothing was ever built
            receiver.recv(KVTicket("shm", SENDER_ID, RECEIVER_ID, next(metas)), 0.5)
        assert rings() == (0, 0)

        reply, got = transfer()
        assert reply["ok"] and got == reply["num_bytes"]
        assert rings() == (1, 1)  # success: the pair and its ring stay for the next transfer

        reply, got = transfer(recv_timeout_s=1.0, stall_after=1, stall_s=2.0)  # receiver times out
        assert isinstance(got, KVTransferTimeout) and not reply["ok"]
        assert rings() == (0, 0)

        assert transfer()[0]["ok"]
        reply, got = transfer(fail_after=2)  # prefill crashes mid-transfer
        assert "PrefillCrashed" in reply["error"] and isinstance(got, KVTransferError)
        # (if the crash came before the receiver took the announcement, the receiver never used
        # the pair: it lets go of it the next time it looks, e.g. for its stats)
        assert receiver.stats()["num_pairs"] == 0
        assert rings() == (0, 0)

        assert transfer()[0]["ok"]
        receiver.receiver.abort()  # dropped while idle: the sender notices and rebuilds, no leak
        assert shm_rings_held() == 0
        reply, got = transfer()
        assert reply["ok"] and got == reply["num_bytes"]
        assert rings() == (1, 1)
        assert child_sender.call("stats")["stats"]["num_pair_setups"] == 4
        assert no_dev_shm_files()
    finally:
        receiver.close()
    assert shm_rings_held() == 0  # (an idle sender lets go of its ring on its next send or forget())


@pytest.mark.timeout(60)
def test_sender_death_fails_the_receiver_fast_and_frees_the_ring(child_sender):
    receiver = KVEndpoint("receiver", "shm", RECEIVER_ID, asdict(CacheSpec(seed=1)), timeout_s=30.0)
    try:
        assert child_sender.call("connect", peer_id=RECEIVER_ID, info=receiver.pair_info(SENDER_ID))["ok"]
        meta = make_meta(CacheSpec(), "t-dies", (1, 2, 3), (4, 5, 6))
        child_sender.request("send", peer_id=RECEIVER_ID, meta=meta, stall_after=1, stall_s=60.0)
        threading.Timer(1.0, child_sender.process.kill).start()
        t0 = time.monotonic()
        with pytest.raises(KVTransferError) as excinfo:
            receiver.recv(KVTicket("shm", SENDER_ID, RECEIVER_ID, meta), 30.0)
        assert not isinstance(excinfo.value, KVTransferTimeout)
        assert time.monotonic() - t0 < 10.0
        assert shm_rings_held() == 0 and no_dev_shm_files()
    finally:
        receiver.close()
