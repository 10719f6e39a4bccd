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


@dataclass(frozen=True)
class History:
    """What penalties and ``min_tokens`` see of one row's request: the tokens before its output
    (the prompt) and its output so far (after a migration: the tokens sent before it too)."""

    prompt: list[int]
    output: list[int]
    stop_ids: frozenset[int]  # EOS (unless ignore_eos) and stop_token_ids: held back before min_tokens


# One output token's log-probability and its top alternatives [[token_id, logprob], ...], most
# likely first (lists: it travels in msgpack as is)
TokenLogprob = tuple[float, list[list]]


def token_logprobs(logits: torch.Tensor, token_ids: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Row i's log-softmax (float32, the raw logits) at ``token_ids[i]`` and its ``tops[i]``
    largest entries; one host sync for all rows."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device).unsqueeze(1)).squeeze(1)
    k = max(tops)
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    return [(c, [[t, v] for t, v in zip(ids[i][:n], values[i][:n])]) for i, (c, n) in enumerate(zip(chosen, tops))]


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


def sample(logits: torch.Tensor, states: list[SamplerState], histories: list[History | None] | None = None) -> list[int]:
    """Pick one token per row. logits: [B, vocab] float32 -> B token ids. ``histories[i]``: row
    i's tokens, needed (not None) where its params have penalties or ``min_tokens``.

    Penalties and ``min_tokens`` apply to every row first (greedy ones too, as in vLLM). Then one
    batched pass for every sampled row (temperature, min-p, top-k, top-p on what top-k kept, then
    a draw) and one host sync for the whole batch. The draw is the exponential race:
    ``argmax(p / E)`` with ``E ~ Exp(1)`` picks token i with probability p_i, so a row needs only its
    own noise — drawn from the request's generator when it is seeded, which keeps a seeded request
    reproducible whatever shares its batch."""
    if histories is not None and any(h is not None for h in histories):
        logits = _apply_history(logits, states, histories)
    token_ids = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
    if rows:
        chosen = _sample_rows(logits[rows], [states[i] for i in rows])
        token_ids[rows] = chosen
    return token_ids.tolist()


def _apply_history(logits: torch.Tensor, states: list[SamplerState], histories: list[History | None]) -> torch.Tensor:
    """vLLM's order: ``min_tokens`` masks the stop ids, then repetition, frequency and presence
    penalties, on a copy of ``logits`` (float32)."""
    logits = logits.float().clone()
    device, vocab = logits.device, logits.shape[-1]
    masked = [(i, h.stop_ids) for i, (s, h) in enumerate(zip(states, histories))
              if h is not None and h.stop_ids and len(h.output) < s.params.min_tokens]
    for i, stop_ids in masked:
        logits[i, torch.tensor(sorted(stop_ids), device=device)] = float("-inf")
    rows = [i for i, s in enumerate(states) if s.params.has_penalties]
    if not rows:
        return logits
    params = [states[i].params for i in rows]
    outs = [histories[i].output for i in rows]
    counts = torch.zeros(len(rows), vocab, device=device)
    flat = [t for out in outs for t in out]
    if flat:
        which = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(o) for o in outs])).to(device)
        counts.index_put_((which, torch.tensor(flat, device=device)), torch.ones(len(flat), device=device),
                          accumulate=True)
    sub = logits[rows]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = counts > 0
        prompts = [histories[i].prompt for i in rows]
        flat_prompt = [t for pr in prompts for t in pr]
        if flat_prompt:
            which = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(p) for p in prompts]))
            seen[which.to(device), torch.tensor(flat_prompt, device=device)] = True
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
    logits[rows] = sub - freq * counts - pres * (counts > 0).float()
    return logits


def _sample_rows(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    device, vocab = logits.device, logits.shape[-1]
    params = [s.params for s in states]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scores = logits.float() / temperature.unsqueeze(1)
    min_p = [p.min_p for p in params]
    if any(min_p):  # against the top token's probability, after temperature (vLLM's order)
        probs = torch.softmax(scores, dim=-1)
        floor = torch.tensor(min_p, device=device).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        scores = scores.masked_fill(probs < floor, float("-inf"))
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
