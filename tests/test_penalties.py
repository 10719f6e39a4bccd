"""Penalties, min-p and min_tokens with vLLM's semantics: on crafted logits against transformers'
logits processors (repetition, min-p, min new tokens) and OpenAI's formula (frequency,
presence); greedy output of the engine against transformers ``generate`` with the same
processors; through the served API in test_http_api.py and after a decode migration in
test_worker_faults.py."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor)

from cluster.config import EngineConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.engine.sampling import History, SamplerState, _apply_history, sample
from cluster.request_types import InvalidRequestError, SamplingParams
from tests.conftest import TEST_ENGINE
from tests.reference import HFReference, prompt_cases


def penalized(logits, params: SamplingParams, prompt: list[int], output: list[int], stop=frozenset()):
    return _apply_history(logits, [SamplerState.create(params)], [History(prompt, output, stop)])


def test_repetition_penalty_equals_transformers_over_prompt_and_output():
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 3
    prompt, output = [1, 5, 5, 9], [9, 12, 30]
    ours = penalized(logits, SamplingParams(repetition_penalty=1.7), prompt, output)
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, want)


def test_frequency_and_presence_follow_openais_formula_over_the_output_only():
    torch.manual_seed(1)
    logits = torch.randn(1, 30)
    prompt, output = [3, 3, 4], [7, 7, 7, 8]
    ours = penalized(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25), prompt, output)
    counts = torch.bincount(torch.tensor(output), minlength=30).float()
    want = logits - 0.5 * counts - (-0.25) * (counts > 0).float()  # mu - c * a_freq - [c > 0] * a_pres
    torch.testing.assert_close(ours, want.unsqueeze(0) if want.dim() == 1 else want)
    assert ours[0, 3] == logits[0, 3]  # prompt tokens are not output


def test_min_tokens_holds_back_eos_and_stop_ids_then_lets_them_go():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # 1 = EOS is the argmax, 2 a stop id next
    p = SamplingParams(min_tokens=3, stop_token_ids=(2,))
    stops = frozenset({1, 2})
    early = [SamplerState.create(p)]
    assert sample(logits, early, [History([0], [3, 3], stops)]) == [3]
    assert sample(logits, early, [History([0], [3, 3, 3], stops)]) == [1]
    want = MinNewTokensLengthLogitsProcessor(1, 3, torch.tensor([1, 2]))(torch.tensor([[0, 3, 3]]), logits.clone())
    torch.testing.assert_close(penalized(logits, p, [0], [3, 3], stops), want)


def test_min_p_keeps_what_transformers_keeps():
    torch.manual_seed(2)
    logits = torch.randn(1, 12) * 2
    kept = MinPLogitsWarper(0.2)(None, logits.clone()).isfinite()[0]
    state = SamplerState.create(SamplingParams(temperature=1.0, min_p=0.2, seed=3))
    drawn = {sample(logits, [state])[0] for _ in range(3000)}
    assert drawn == set(kept.nonzero().flatten().tolist())


@pytest.mark.parametrize("kwargs,match", [
    ({"presence_penalty": 2.5}, "presence_penalty must be in"), ({"frequency_penalty": float("nan")}, "frequency"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens must be in"),
])
def test_out_of_range_params_are_refused(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs).validate(4096, 1000)


@pytest.fixture(scope="module")
def llava(tiny_models):
    path = tiny_models["llava-clip-llama"]
    return ColocatedEngine(EngineConfig(model=str(path), **TEST_ENGINE)), HFReference(path)


def test_greedy_with_penalties_and_min_tokens_equals_transformers(llava):
    """Repetition penalty (prompt and output, image placeholders included) and min new tokens:
    token for token against ``generate`` with transformers' own processors."""
    engine, ref = llava
    for name in ("text", "one-image"):
        prompt, media = prompt_cases("llava-clip-llama")[name]
        want = ref.greedy_with(prompt, media, 24, repetition_penalty=2.0, min_new_tokens=24)
        [got] = engine.generate([(prompt, media, SamplingParams(max_tokens=24, ignore_eos=True,
                                                                repetition_penalty=2.0))])
        assert got.token_ids == want, name
        plain = ref.greedy(prompt, media, 24)
        assert plain != want  # the penalty changed the output (24 tokens repeat some)
        stop = plain[3]  # as a stop id: the plain output would end after 4 tokens
        if stop in plain[:3]:
            continue  # (a token the output already had: no clean cut)
        [short] = engine.generate([(prompt, media, SamplingParams(max_tokens=16, ignore_eos=True,
                                                                  stop_token_ids=(stop,)))])
        assert short.token_ids == plain[:4]
        [held] = engine.generate([(prompt, media, SamplingParams(max_tokens=16, ignore_eos=True,
                                                                 stop_token_ids=(stop,), min_tokens=10))])
        want = ref.greedy_with(prompt, media, 16, min_new_tokens=10, eos_token_id=[stop])
        assert held.token_ids == want and len(held.token_ids) >= 10, name
