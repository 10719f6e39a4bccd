import math

import pytest
import torch

from cluster.engine.sampling import SamplerState, sample
from cluster.request_types import InvalidRequestError, SamplingParams


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    states = [SamplerState.create(SamplingParams()) for _ in range(2)]
    assert sample(logits, states) == [1, 0]


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(logits, [SamplerState.create(p)])[0] for _ in range(1)]
    s1, s2 = SamplerState.create(p), SamplerState.create(p)
    seq1 = [sample(logits, [s1])[0] for _ in range(10)]
    other = SamplerState.create(SamplingParams(temperature=1.0, seed=99))
    seq2 = [sample(torch.cat([logits, logits]), [other, s2])[1] for _ in range(10)]
    assert seq1 == seq2 and seq1[0] == alone[0]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, -10.0, -10.0]])
    k = SamplerState.create(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {sample(logits, [k])[0] for _ in range(50)} <= {0, 1}
    p = SamplerState.create(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {sample(logits, [p])[0] for _ in range(50)} == {0}


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "exceeds"),
    ({"top_k": -1}, "top_k"),
    ({"stop": tuple(str(i) for i in range(100))}, "stop strings"),
    ({"stop_token_ids": (10**7,)}, "outside the vocabulary"),
])
def test_invalid_params_are_rejected(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs).validate(max_tokens_limit=4096, vocab_size=1000)


def test_batched_sampling_follows_the_filtered_distribution():
    """Each sampled row of a mixed batch draws from softmax(logits / T) restricted by its own top-k
    and top-p, and greedy rows in the same batch stay argmax."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    params = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=1.0, top_p=0.8)]
    states = [SamplerState.create(p) for p in params]
    n = 4000
    counts = torch.zeros(len(params), 5)
    torch.manual_seed(0)
    for _ in range(n // 100):
        picks = torch.tensor([sample(logits.expand(len(params), 5), states) for _ in range(100)])
        for row in range(len(params)):
            counts[row] += torch.bincount(picks[:, row], minlength=5)
    assert counts[0, 0] == n  # greedy
    expected_t = torch.softmax(logits[0] / 0.7, -1)
    expected_k = torch.softmax(logits[0, :3], -1)
    base = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, ...: the mass before the third is past 0.8
    expected_p = base[:2] / base[:2].sum()
    for row, expected in ((1, expected_t), (2, expected_k), (3, expected_p)):
        freq = counts[row, :len(expected)] / n
        assert counts[row, len(expected):].sum() == 0
        assert torch.allclose(freq, expected, atol=0.03), (row, freq, expected)
