"""Scheduler policy on CPU with fake model outputs (no model needed)."""

from cluster.engine.block_manager import BlockManager
from cluster.engine.request import Request, RequestStatus
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_blocks=16, block_size=4, max_tokens=64, max_seqs=8):
    return Scheduler(SchedulerConfig(max_seqs, max_tokens, num_blocks * block_size), BlockManager(num_blocks, block_size))


def make_request(rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run_step(sched: Scheduler, token: int = 7):
    """Schedule, then apply fake model outputs the way the engine does."""
    batch = sched.schedule()
    if batch is None:
        return None
    for req, n in zip(batch.requests, batch.num_new_tokens):
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(token)
            if req.check_stop(sched.config.max_model_len):
                sched.finish(req, RequestStatus.FINISHED_LENGTH)
    return batch


def test_new_requests_join_running_batch_between_steps():
    sched = make_scheduler()
    sched.add(make_request("a", 5))
    b1 = run_step(sched)
    assert [r.request_id for r in b1.requests] == ["a"] and b1.num_new_tokens == [5]
    sched.add(make_request("b", 3))
    b2 = run_step(sched)
    # "a" decodes (1 token) while "b" prefills in the same step; decode rows first.
    assert [r.request_id for r in b2.requests] == ["a", "b"] and b2.num_new_tokens == [1, 3]


def test_long_prompt_is_chunked_by_token_budget():
    sched = make_scheduler(num_blocks=64, max_tokens=16)
    sched.add(make_request("long", 40))
    chunks = [run_step(sched).num_new_tokens[0] for _ in range(3)]
    assert chunks == [16, 16, 8]
    assert sched.running[0].output_token_ids == [7]


def test_admission_waits_for_free_blocks_fcfs():
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add(make_request("a", 12, max_tokens=2))  # 3 blocks
    sched.add(make_request("b", 8))  # 2 blocks: must wait
    run_step(sched)
    assert [r.request_id for r in sched.running] == ["a"] and len(sched.waiting) == 1
    while sched.running:
        run_step(sched)
    run_step(sched)
    assert [r.request_id for r in sched.running] == ["b"]


def test_kv_exhaustion_preempts_newest_and_recomputes():
    # Each request ends at 27 tokens (7 blocks); the cache has 8, so both cannot be resident.
    sched = make_scheduler(num_blocks=8, block_size=4, max_tokens=64)
    a, b = make_request("a", 7, max_tokens=20), make_request("b", 7, max_tokens=20)
    sched.add(a)
    sched.add(b)
    for _ in range(200):
        if run_step(sched) is None:
            break
        used = {blk for r in sched.running for blk in r.block_ids}
        assert len(used) == sum(len(r.block_ids) for r in sched.running), "a block is shared"
    assert a.num_preemptions + b.num_preemptions >= 1
    assert a.status.is_finished and b.status.is_finished
    assert len(a.output_token_ids) == 20 and len(b.output_token_ids) == 20
    assert sched.blocks.num_free_blocks == 8


def test_finish_and_abort_free_blocks():
    sched = make_scheduler()
    req = make_request("a", 9)
    sched.add(req)
    run_step(sched)
    assert sched.blocks.num_used_blocks == 3
    sched.finish(req, RequestStatus.FINISHED_ABORTED)
    sched.finish(req, RequestStatus.FINISHED_ABORTED)  # idempotent
    assert sched.blocks.num_used_blocks == 0 and not sched.running


def test_max_model_len_beyond_cache_is_refused():
    import pytest

    with pytest.raises(ValueError, match="exceeds the KV cache"):
        Scheduler(SchedulerConfig(8, 64, 1000), BlockManager(4, 4))
