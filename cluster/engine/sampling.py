"""The batched sampler, over ``SamplingParams`` (``cluster.request_types``: validated once, at the
front door).

Semantics follow vLLM's ``SamplingParams``: ``temperature == 0`` is greedy (so is any temperature
below ``MIN_SAMPLING_TEMPERATURE``, where logits / T would overflow float32); ``top_k <= 0`` and
``top_p == 1`` disable those filters; ``seed`` makes one request's sampling reproducible whatever
else shares its batch (each seeded request owns a ``torch.Generator``); ``ignore_eos`` keeps going
past EOS until ``max_tokens``; ``stop`` strings end the output before the match (the match itself
is not returned), ``stop_token_ids`` end it after the token (not returned in the text either).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.request_types import SamplingParams

@dataclass
class SamplerState:
    """Per-request sampling state that must survive across steps (and preemption)."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    @classmethod
    def create(cls, params: SamplingParams) -> "SamplerState":
        gen = None
        if params.seed is not None and not params.is_greedy:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(params.seed)
        return cls(params, gen)


def sample(logits: torch.Tensor, states: list[SamplerState]) -> list[int]:
    """Pick one token per row. logits: [B, vocab] float32 -> B token ids.

    One batched pass for every sampled row (temperature, then top-k, then top-p on what top-k
    kept, then a draw) and one host sync for the whole batch. The draw is the exponential race:
    ``argmax(p / E)`` with ``E ~ Exp(1)`` picks token i with probability p_i, so a row needs only its
    own noise — drawn from the request's generator when it is seeded, which keeps a seeded request
    reproducible whatever shares its batch."""
    token_ids = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
    if rows:
        chosen = _sample_rows(logits[rows], [states[i] for i in rows])
        token_ids[rows] = chosen
    return token_ids.tolist()


def _sample_rows(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    device, vocab = logits.device, logits.shape[-1]
    params = [s.params for s in states]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scores = logits.float() / temperature.unsqueeze(1)
    order = None
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    filter_k, filter_p = any(k < vocab for k in top_k), any(p.top_p < 1.0 for p in params)
    if filter_k or filter_p:
        scores, order = scores.sort(dim=-1, descending=True)
        drop = torch.zeros_like(scores, dtype=torch.bool)
        if filter_k:
            ranks = torch.arange(vocab, device=device).unsqueeze(0)
            drop = ranks >= torch.tensor(top_k, device=device).unsqueeze(1)
        if filter_p:
            probs = torch.softmax(scores.masked_fill(drop, float("-inf")), dim=-1)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            # Drop a token when the mass before it already reaches top_p (the first always stays).
            drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, state in enumerate(states):
        if state.generator is not None:
            noise[row] = torch.empty(vocab).exponential_(generator=state.generator).to(device)
    chosen = (probs / noise).argmax(dim=-1)
    if order is not None:  # chosen is a rank in the sorted row: map it back to the token id
        chosen = order.gather(1, chosen.unsqueeze(1)).squeeze(1)
    return chosen
