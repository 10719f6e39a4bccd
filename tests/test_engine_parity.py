"""Token-exact parity of the colocated engine with transformers' greedy ``generate``."""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import SamplingParams
from tests.conftest import ARCHS
from tests.reference import HFReference, prompt_cases

NUM_TOKENS = 20


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tiny_models):
    arch = request.param
    engine = ColocatedEngine(EngineConfig(model=str(tiny_models[arch]), max_num_batched_tokens=512))
    return arch, engine, HFReference(tiny_models[arch])


def test_token_plan_equals_hf_processor(arch_setup):
    arch, engine, ref = arch_setup
    for name, (prompt, media) in prompt_cases(arch).items():
        ours = engine.inputs.prepare("x", prompt, media, SamplingParams()).plan.prompt_token_ids
        assert ours == ref.inputs(prompt, media)["input_ids"][0].tolist(), name


def test_greedy_equals_transformers_alone_and_batched(arch_setup):
    arch, engine, ref = arch_setup
    cases = prompt_cases(arch)
    greedy = SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)
    expected = {name: ref.greedy(p, m, NUM_TOKENS) for name, (p, m) in cases.items()}
    for name, tokens in expected.items():
        assert len(set(tokens)) > 3, f"degenerate reference for {name}: {tokens}"

    # Each prompt alone.
    for name, (p, m) in cases.items():
        [c] = engine.generate([(p, m, greedy)])
        assert c.token_ids == expected[name], name
    # All prompts in one continuous batch, with extra prompts of other lengths mixed in.
    fillers = [("Once upon a time " * k, [], SamplingParams(max_tokens=NUM_TOKENS + k, ignore_eos=True))
               for k in (1, 7)]
    batch = fillers[:1] + [(p, m, greedy) for p, m in cases.values()] + fillers[1:]
    results = engine.generate(batch)[1:-1]
    for (name, _), c in zip(cases.items(), results):
        assert c.token_ids == expected[name], f"{name} changed when batched"
    assert engine.kv_blocks_in_use == 0


def test_prefill_logits_close_to_transformers(arch_setup, tiny_models):
    """The model code with torch's own matmuls (as transformers runs them) to 1e-4; the engine as
    served (``linear_backend: auto``, oneDNN's reordered weights where the CPU has a kernel, whose
    different summation order moves float32 logits by ~1e-4) to 1e-3."""
    arch, engine, ref = arch_setup
    strict = ColocatedEngine(EngineConfig(model=str(tiny_models[arch]), max_num_batched_tokens=512,
                                          linear_backend="torch"))
    for name, (prompt, media) in prompt_cases(arch).items():
        prepared = engine.inputs.prepare("x", prompt, media, SamplingParams())
        expected = ref.prefill_logits(prompt, media)
        torch.testing.assert_close(_engine_prefill_logits(strict, prepared), expected, atol=1e-4, rtol=1e-4,
                                   msg=name)
        torch.testing.assert_close(_engine_prefill_logits(engine, prepared), expected, atol=1e-3, rtol=1e-3,
                                   msg=f"{name} (served linear backend {engine.runner.linear_backend})")


def test_chunked_prefill_matches_unchunked(tiny_models):
    """A prompt longer than the token budget is prefilled in chunks with the same result."""
    path = str(tiny_models["llava-clip-llama"])
    prompt, media = prompt_cases("llava-clip-llama")["two-images"]
    greedy = SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)
    whole = ColocatedEngine(EngineConfig(model=path, max_num_batched_tokens=2048)).generate([(prompt, media, greedy)])
    chunked = ColocatedEngine(EngineConfig(model=path, max_num_batched_tokens=100)).generate([(prompt, media, greedy)])
    assert whole[0].token_ids == chunked[0].token_ids


def test_bfloat16_runs_and_mostly_agrees(tiny_models):
    path = str(tiny_models["llava-siglip-qwen2"])
    prompt, media = prompt_cases("llava-siglip-qwen2")["one-image"]
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    fp32 = ColocatedEngine(EngineConfig(model=path)).generate([(prompt, media, greedy)])[0].token_ids
    bf16 = ColocatedEngine(EngineConfig(model=path, dtype="bfloat16")).generate([(prompt, media, greedy)])[0].token_ids
    assert len(bf16) == 8 and bf16[0] == fp32[0]


def _engine_prefill_logits(engine: ColocatedEngine, prepared) -> torch.Tensor:
    """Last-position logits of a one-request prefill step through the engine's own runner."""
    from cluster.engine.request import Request, media_slots
    from cluster.engine.scheduler import ScheduledBatch

    embeddings = engine.encoder.encode(prepared.media)
    slots = media_slots(prepared.plan.media_runs, embeddings, [""] * len(embeddings))
    req = Request("x", prepared.plan.prompt_token_ids, prepared.sampling, slots,
                  mrope_positions=prepared.plan.mrope_positions, position_delta=prepared.plan.position_delta)
    req.block_ids = engine.blocks.allocate(engine.blocks.blocks_for_tokens(req.num_tokens))
    captured = {}
    original = engine.runner.lm.compute_logits
    engine.runner.lm.compute_logits = lambda h: captured.setdefault("logits", original(h))
    try:
        engine.runner.execute(ScheduledBatch([req], [req.num_tokens]))
    finally:
        engine.runner.lm.compute_logits = original
        engine.blocks.free(req.block_ids)
    return captured["logits"][0]
