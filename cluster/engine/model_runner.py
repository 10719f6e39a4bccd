"""``ModelRunner``: executes one scheduled step of the language model over the paged KV cache.

It owns the cache tensor and turns a ``ScheduledBatch`` into the packed inputs the model takes:
token embeddings with media embeddings spliced in at their placeholder positions, and the step's
attention metadata, built once for every layer by the attention backend
(``models.attention_backend``). It samples for the requests whose step reaches the end of their
tokens and returns those tokens; it changes no request state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.engine.request import Request
from cluster.engine.sampling import sample, token_logprobs
from cluster.engine.structured import GrammarState, apply_grammars
from cluster.engine.scheduler import ScheduledBatch
from models.attention_backend import make_attention_backend
from models.linear import apply_linear_backend
from models.llm import CausalLM
from models.mrope import step_positions
from models.paged_attention import KVCacheSpec


class ModelRunner:
    def __init__(self, lm: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", attention_backend: str = "auto", linear_backend: str = "auto",
                 model_dir: str | None = None):
        self.lm = lm
        self.model_dir = model_dir  # its tokenizer, loaded at the first structured-output request
        self._tokenizer = None
        self.device = torch.device(device)
        self.linear_backend = apply_linear_backend(lm.model.layers, linear_backend, dtype, self.device)
        self.attention = make_attention_backend(attention_backend, self.device)
        self.spec = KVCacheSpec(
            num_layers=lm.num_layers, num_blocks=num_blocks, block_size=block_size,
            num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim, dtype=dtype,
        )
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_cache = self.spec.allocate(self.device)

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """Every layer's K and V of block ``src`` into block ``dst`` (copy-on-write of a fork)."""
        self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, on_layer: Callable[[int], None] | None = None) -> list[int | None]:
        """Run one step; returns the sampled token per request (None: mid-prefill chunk).
        ``on_layer(i)``: layer i's KV of this step is written (layer-wise KV streaming)."""
        starts = [r.num_computed_tokens for r in batch.requests]
        ends = [s + n for s, n in zip(starts, batch.num_new_tokens)]
        token_ids = [t for r, s, e in zip(batch.requests, starts, ends) for t in r.token_ids(s, e)]
        embeds = self.lm.embed(torch.tensor(token_ids, dtype=torch.int64, device=self.device))
        row, stacked = 0, []
        for req, s, e in zip(batch.requests, starts, ends):
            stacked += self._splice_media(embeds[row: row + e - s], req, s, e, row)
            row += e - s
        deepstack = None
        if stacked:  # Qwen3-VL: (rows, [rows, layers * hidden]) added after the first layers
            deepstack = (torch.cat([torch.arange(r0, r0 + len(x)) for r0, x in stacked]).to(self.device),
                         torch.cat([x for _, x in stacked]).to(self.device, embeds.dtype))

        meta = self.attention.build(batch.num_new_tokens, ends, [r.block_ids for r in batch.requests],
                                    self.spec.block_size)
        positions = self._mrope_positions(batch.requests, starts, ends) if self.lm.is_mrope else None
        hidden = self.lm(embeds, meta, self.kv_cache, positions, deepstack, on_layer)  # [T, hidden]

        # Sample only for requests whose step covered all their tokens.
        last_rows, samplers, histories, sampled_idx = [], [], [], []
        row = 0
        for i, (req, s, e) in enumerate(zip(batch.requests, starts, ends)):
            row += e - s
            if e == req.num_tokens:
                last_rows.append(row - 1)
                samplers.append(req.sampler)
                histories.append(req.history())
                sampled_idx.append(i)
        out: list[int | None] = [None] * len(batch)
        if last_rows:
            logits = self.lm.compute_logits(hidden[torch.tensor(last_rows, device=self.device)])
            constrained = [j for j, i in enumerate(sampled_idx) if batch.requests[i].sampling.structured_output]
            masked = logits
            if constrained:
                grammars = [self._grammar(batch.requests[sampled_idx[j]], logits.shape[-1]) for j in constrained]
                masked = apply_grammars(logits, constrained, grammars)
            tokens = sample(masked, samplers, histories)
            for i, tok in zip(sampled_idx, tokens):
                out[i] = tok
            for j in constrained:
                batch.requests[sampled_idx[j]].grammar.advance(tokens[j])
            wanted = [j for j, s in enumerate(samplers) if s.params.logprobs is not None]
            if wanted:  # from the raw logits, before penalties and temperature
                lps = token_logprobs(logits[wanted], [tokens[j] for j in wanted],
                                     [samplers[j].params.logprobs for j in wanted])
                for j, lp in zip(wanted, lps):
                    batch.requests[sampled_idx[j]].output_logprobs.append(lp)
        return out

    def _grammar(self, req: Request, vocab_size: int):
        """``req``'s grammar state on this worker, made from its outputs so far the first time."""
        if req.grammar is None:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            req.grammar = GrammarState(req.sampling.structured_output, self._tokenizer, vocab_size,
                                       tuple(sorted(req.eos_token_ids)), req.outputs_so_far())
        return req.grammar

    def _mrope_positions(self, requests: list[Request], starts: list[int], ends: list[int]) -> torch.Tensor:
        """[3, T]: each request's planned 3-D prompt positions, ``index + delta`` after them."""
        if all(r.mrope_positions is None or s >= r.mrope_positions.shape[1] for r, s in zip(requests, starts)):
            flat = [i + r.position_delta for r, s, e in zip(requests, starts, ends) for i in range(s, e)]
            return torch.tensor(flat, dtype=torch.int64, device=self.device).expand(3, -1)
        parts = [step_positions(r.mrope_positions, r.position_delta, s, e) for r, s, e in zip(requests, starts, ends)]
        return torch.cat(parts, dim=1).to(self.device)

    @staticmethod
    def _splice_media(embeds: torch.Tensor, req: Request, start: int, end: int,
                      row0: int) -> list[tuple[int, torch.Tensor]]:
        """Overwrite placeholder rows of positions [start, end) with the media embeddings; returns
        (batch row, the extra columns) of items wider than the LM (Qwen3-VL's DeepStack features,
        concatenated after the embedding by the encoder)."""
        hidden, extra = embeds.shape[-1], []
        for slot in req.media:
            lo, hi = max(start, slot.offset), min(end, slot.offset + slot.length)
            if lo < hi:
                rows = slot.embeddings[lo - slot.offset: hi - slot.offset]
                embeds[lo - start: hi - start] = rows[:, :hidden].to(embeds.dtype)
                if rows.shape[-1] > hidden:
                    extra.append((row0 + lo - start, rows[:, hidden:]))
        return extra
