"""Router pieces that need no cluster: routing policies, admission control, status translation."""

import asyncio

import pytest

from cluster.controller import Controller, PoolWorker, WorkerState
from router import policies
from router.admission import Admission
from router.events import OverloadedError


def make_workers(pool: str, n: int, **load) -> list[PoolWorker]:
    workers = [PoolWorker(f"{pool}-{i}", pool, actor=None, state=WorkerState.READY) for i in range(n)]
    for w in workers:
        for k, v in load.items():
            setattr(w, k, v)
    return workers


# -- encoder: rendezvous affinity, then load ---------------------------------------------------
def test_encoder_affinity_is_stable_and_spreads_keys():
    workers = make_workers("encoder", 4)
    keys = [f"hash-{i}" for i in range(400)]
    picks = [policies.pick_encoder(workers, [k], max_queue=8).worker_id for k in keys]
    assert picks == [policies.pick_encoder(workers, [k], max_queue=8).worker_id for k in keys]  # stable
    counts = {w.worker_id: picks.count(w.worker_id) for w in workers}
    assert all(60 < c < 140 for c in counts.values()), counts  # roughly even


def test_encoder_affinity_moves_only_the_removed_workers_keys():
    workers = make_workers("encoder", 4)
    keys = [f"hash-{i}" for i in range(200)]
    before = {k: policies.pick_encoder(workers, [k], 8).worker_id for k in keys}
    after = {k: policies.pick_encoder(workers[:3], [k], 8).worker_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "encoder-3" for k in moved)


def test_encoder_falls_back_to_least_loaded_when_the_affine_worker_is_busy():
    workers = make_workers("encoder", 3)
    affine = policies.pick_encoder(workers, ["k"], max_queue=8)
    affine.inflight_tokens = 9
    others = [w for w in workers if w is not affine]
    others[0].inflight_tokens = 5
    assert policies.pick_encoder(workers, ["k"], max_queue=8) is others[1]
    affine.inflight_tokens = 8  # at the limit: still affine
    assert policies.pick_encoder(workers, ["k"], max_queue=8) is affine


def test_encoder_request_goes_where_most_of_its_items_are_affine():
    workers = make_workers("encoder", 3)
    keys = [f"h{i}" for i in range(50)]
    by_worker: dict[str, list[str]] = {}
    for k in keys:
        by_worker.setdefault(policies.affine_worker(k, workers).worker_id, []).append(k)
    (wa, ka), (wb, kb) = list(by_worker.items())[:2]
    assert policies.pick_encoder(workers, [kb[0], ka[0], ka[1]], 8).worker_id == wa


# -- prefill and decode ------------------------------------------------------------------------
def test_prefill_picks_fewest_queued_tokens():
    workers = make_workers("prefill", 3)
    workers[0].inflight_tokens, workers[1].inflight_tokens, workers[2].inflight_tokens = 900, 100, 300
    assert policies.pick_prefill(workers) is workers[1]


def test_decode_ranks_by_free_blocks_then_batch_size():
    workers = make_workers("decode", 3, kv_blocks_total=100)
    workers[0].reserved_blocks, workers[1].reserved_blocks, workers[2].reserved_blocks = 50, 10, 10
    workers[1].inflight_requests, workers[2].inflight_requests = 5, 2
    assert [w.worker_id for w in policies.rank_decode(workers)] == ["decode-2", "decode-1", "decode-0"]
    # a worker believed too full for the request goes last
    assert policies.rank_decode(workers, num_blocks_needed=60)[-1] is workers[0]


def test_empty_pools_raise():
    with pytest.raises(LookupError):
        policies.pick_prefill([])
    with pytest.raises(LookupError):
        policies.pick_encoder([], ["k"], 8)


# -- admission control -------------------------------------------------------------------------
def test_admission_bounds_inflight_and_queue_then_rejects():
    async def scenario():
        adm = Admission(max_inflight=2, max_queued=1)
        await adm.acquire()
        await adm.acquire()
        waiter = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        assert adm.num_queued == 1 and not waiter.done()
        with pytest.raises(OverloadedError):
            await adm.acquire()
        adm.release()  # the slot goes to the waiter
        await asyncio.wait_for(waiter, 1)
        assert adm.num_inflight == 2 and adm.num_queued == 0
        adm.release()
        adm.release()
        assert adm.num_inflight == 0

    asyncio.run(scenario())


def test_admission_cancelled_waiter_leaves_the_queue():
    async def scenario():
        adm = Admission(max_inflight=1, max_queued=4)
        await adm.acquire()
        waiter = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.num_queued == 0
        adm.release()
        assert adm.num_inflight == 0

    asyncio.run(scenario())


# -- controller --------------------------------------------------------------------------------
def test_controller_membership_states_and_status_shape():
    ctl = Controller({"encoder": 1, "prefill": 1, "decode": 2})
    for pool, wid in [("encoder", "encoder-0"), ("prefill", "prefill-0"), ("decode", "decode-0"),
                      ("decode", "decode-1")]:
        ctl.add_worker(pool, wid, actor=None)
    with pytest.raises(ValueError):
        ctl.add_worker("decode", "decode-0", actor=None)
    assert ctl.ready_workers("decode") == []  # STARTING workers are not routed to
    from cluster.contracts import WorkerInfo

    ctl.mark_ready("decode-0", WorkerInfo("decode-0", "decode", "n1", 1), {"kv_blocks_total": 10,
                                                                          "kv_bytes_received": 300})
    ctl.mark_ready("decode-1", WorkerInfo("decode-1", "decode", "n1", 2), {"kv_blocks_total": 10})
    ctl.drain_worker("decode-1")
    assert [w.worker_id for w in ctl.ready_workers("decode")] == ["decode-0"]
    ctl.mark_dead("prefill-0", "boom")
    status = ctl.status("gloo")
    states = {w["id"]: w["state"] for p in status["pools"].values() for w in p["workers"]}
    assert states == {"encoder-0": "starting", "prefill-0": "dead", "decode-0": "ready", "decode-1": "draining"}
    assert status["pools"]["decode"]["desired_size"] == 2
    assert status["kv_transfer"] == {"transport": "gloo", "bytes": 300, "transfers_completed": 0,
                                     "transfers_failed": 0, "transfers_streamed": 0}
    ctl.remove_worker("decode-1")
    assert [w.worker_id for w in ctl.workers("decode")] == ["decode-0"]


# -- decode sink: a worker's token stream into the request's events ---------------------------
def test_tokens_merged_with_a_failure_reach_the_client_before_it(tiny_models):
    """A stream that fell behind merges steps: the tokens of steps before a failed one arrive in
    the same delta as its "error". They must be emitted (the migration continues after every
    token counted as sent); then the sink fails."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from cluster.engine.detokenizer import IncrementalDetokenizer
    from router.decode_sink import DecodeSink
    from router.events import WorkerUnavailableError

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llava-siglip-qwen2"])
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]

    async def run():
        events, tokens = [], []
        st = SimpleNamespace(num_tokens_sent=0, decode_done=False)
        sink = DecodeSink(st, {"first": 0.0}, "decode worker d-0", IncrementalDetokenizer(tokenizer), tokens,
                          events.append)
        sink.push(ids[:1], None)
        sink.push(ids[1:], "error")
        with pytest.raises(WorkerUnavailableError, match="d-0 failed"):
            await sink.done
        return events, tokens, st

    events, tokens, st = asyncio.run(run())
    assert [t for e in events for t in e.token_ids] == tokens == ids  # every token counted was emitted
    assert "".join(e.text for e in events) == tokenizer.decode(ids)
    assert st.num_tokens_sent == len(ids) and not st.decode_done
