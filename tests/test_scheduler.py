"""Scheduler policy on CPU with fake model outputs (no model needed)."""

from cluster.engine.block_manager import BlockManager
from cluster.engine.request import Request, RequestStatus
from cluster.request_types import SamplingParams
from cluster.engine.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_blocks=16, block_size=4, max_tokens=64, max_seqs=8, prefix_caching=False):
    return Scheduler(SchedulerConfig(max_seqs, max_tokens, num_blocks * block_size, prefix_caching),
                     BlockManager(num_blocks, block_size))


def make_request(rid: str, prompt_len: int, max_tokens: int = 8, prompt: list[int] | None = None) -> Request:
    prompt = prompt if prompt is not None else list(range(1, prompt_len + 1))
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run_step(sched: Scheduler, token: int = 7):
    """Schedule, then apply fake model outputs the way the engine does."""
    batch = sched.schedule()
    if batch is None:
        return None
    size = sched.blocks.block_size
    for req, n in zip(batch.requests, batch.num_new_tokens):
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + n):  # what the step writes
            blk = req.block_ids[pos // size]
            assert sum(blk in r.block_ids for r in sched.running) == 1, "a step writes into a shared block"
    for req, n in zip(batch.requests, batch.num_new_tokens):
        sched.mark_computed(req, n)
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


# -- prefix caching -----------------------------------------------------------------------------

def run_until_done(sched: Scheduler, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if run_step(sched) is None:
            return
    raise AssertionError("requests did not finish")


def test_prefix_hit_starts_the_request_after_the_cached_blocks():
    sched = make_scheduler(prefix_caching=True)
    sched.add(make_request("a", 10, max_tokens=1))  # blocks [1-4] [5-8] [9 10 ...]
    run_until_done(sched)
    assert sched.blocks.num_cached_blocks == 2 and sched.blocks.num_free_blocks == 16
    b = make_request("b", 0, prompt=list(range(1, 9)) + [50, 51, 52])  # same first 2 blocks, then other text
    sched.add(b)
    batch = run_step(sched)
    assert b.num_cached_tokens == 8 and batch.num_new_tokens == [3]
    assert (sched.num_prefix_hit_tokens, sched.num_prefix_query_tokens) == (8, 10 + 11)


def test_prefix_hit_never_covers_the_whole_prompt():
    sched = make_scheduler(prefix_caching=True)
    sched.add(make_request("a", 9, max_tokens=1))
    run_until_done(sched)
    for prompt_len, cached in ((8, 4), (9, 8), (4, 0), (1, 0)):  # the last token is always computed
        req = make_request(f"again-{prompt_len}", prompt_len, max_tokens=1)
        sched.add(req)
        batch = run_step(sched)
        assert req.num_cached_tokens == cached and batch.num_new_tokens == [prompt_len - cached], prompt_len
        assert req.output_token_ids == [7]  # sampled: the step reached the end of the prompt
        run_until_done(sched)


def test_running_requests_share_blocks_until_the_last_one_frees_them():
    sched = make_scheduler(prefix_caching=True)
    a = make_request("a", 9, max_tokens=4)
    sched.add(a)
    run_step(sched)  # a's prompt: 2 full blocks registered
    b = make_request("b", 0, prompt=list(range(1, 9)) + [40, 41, 42, 43, 44], max_tokens=2)
    sched.add(b)
    run_step(sched)  # a decodes, b prefills after the shared blocks
    assert b.block_ids[:2] == a.block_ids[:2] and b.num_cached_tokens == 8
    shared = a.block_ids[:2]
    assert sched.blocks.num_used_blocks == len(set(a.block_ids) | set(b.block_ids))
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    assert set(shared) <= set(b.block_ids) and sched.blocks.num_used_blocks == len(b.block_ids)
    run_until_done(sched)
    assert b.status.is_finished and sched.blocks.num_used_blocks == 0 and sched.blocks.num_free_blocks == 16
    assert sched.blocks.lookup(b.block_hashes[:2]) == shared  # nobody holds them: still cached


def test_without_prefix_caching_nothing_is_shared_or_cached():
    sched = make_scheduler(prefix_caching=False)
    for rid in "ab":
        sched.add(make_request(rid, 9, max_tokens=1))
        run_until_done(sched)
    assert sched.num_prefix_hit_tokens == 0 and sched.blocks.num_cached_blocks == 0


def test_preemption_drops_references_and_readmission_reuses_the_cache():
    # Requests with one common 8-token prefix, outgrowing a small cache: preemption recomputes.
    sched = make_scheduler(num_blocks=10, block_size=4, max_tokens=64, prefix_caching=True)
    common = list(range(1, 9))
    reqs = [make_request(f"r{i}", 0, prompt=common + [100 + i, 101 + i], max_tokens=14) for i in range(3)]
    sched.add(reqs[0])
    run_step(sched)  # r0's prompt is in the cache before the others arrive
    for r in reqs[1:]:
        sched.add(r)
    run_until_done(sched)
    assert sum(r.num_preemptions for r in reqs) >= 1
    assert all(r.status.is_finished and len(r.output_token_ids) == 14 for r in reqs)
    assert sched.blocks.num_used_blocks == 0 and sched.blocks.num_free_blocks == 10
    assert sched.num_prefix_hit_tokens >= 8 * 2  # r1 and r2 began on r0's blocks
