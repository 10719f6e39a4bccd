"""``ColocatedEngine``: encode, prefill and decode in one process, with continuous batching.

The baseline every benchmark compares against, and the engine for small single-device
deployments. One step::

    encode media of newly added requests (one tower forward for all of them)
    batch = scheduler.schedule()          # decodes + prefill chunks under a token budget
    tokens = runner.execute(batch)        # one LM forward, sampling where a sequence is complete
    outputs = postprocess(batch, tokens)  # append, detokenize, stop checks, free finished

New requests join the running batch between steps; nothing waits for the batch to drain. A step
whose encode or forward raises ends only the requests it held, with finish reason "error"
(``last_step_error`` says why); the engine goes on with the next step.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from cluster.config import EngineConfig
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.encoder_runner import EncoderRunner
from cluster.engine.inputs import InputPreparer, PreparedRequest
from cluster.engine.request import Request, RequestStatus, media_slots
from cluster.request_types import MediaInput, SamplingParams
from cluster.engine.setup import build_lm_engine, eos_token_ids, resolve_engine_model
from cluster.faults import FaultInjector
from models.loader import load_model
from models.processor import MultimodalProcessor


@dataclass
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    text: str  # text delta
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list | None = None  # SamplingParams.logprobs set: a TokenLogprob per new token


@dataclass
class Completion:
    """A finished request, for non-streaming callers."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float
    logprobs: list | None = None  # SamplingParams.logprobs set: a TokenLogprob per token


class ColocatedEngine:
    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None):
        self.config = config
        self.faults = faults or FaultInjector("colocated-engine")
        self.last_step_error: BaseException | None = None  # why the last step failed; None if it did not
        self.model_dir = resolve_engine_model(config)
        self.model = load_model(self.model_dir, dtype=config.torch_dtype, device=config.device)
        self.processor = MultimodalProcessor(self.model_dir, self.model.config)
        self.tokenizer = self.processor.tokenizer
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        lm = build_lm_engine(config, self.model)
        self.runner, self.blocks, self.scheduler, self.max_model_len = (
            lm.runner, lm.blocks, lm.scheduler, lm.max_model_len)
        self.encoder = EncoderRunner(self.model, self.processor, config.device)
        self.inputs = InputPreparer(self.processor, config.limits.media(), self.max_model_len,
                                    config.limits.max_tokens, chat_template=config.chat_template or None)
        self._to_encode: list[PreparedRequest] = []
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()

    # -- request API -------------------------------------------------------------------------
    def add_request(self, prompt: str, media: list[MediaInput] = (), sampling: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        """Validate and queue a request (raises ``InvalidRequestError``); encoding happens in
        the next ``step`` together with the other new requests' media."""
        request_id = request_id or f"req-{next(self._ids)}"
        self.add_prepared(self.inputs.prepare(request_id, prompt, list(media), sampling))
        return request_id

    def add_prepared(self, prepared: PreparedRequest) -> None:
        """Queue a request a front door already validated (``InputPreparer.prepare``)."""
        rid = prepared.request_id
        if rid in self._requests or any(p.request_id == rid for p in self._to_encode):
            raise ValueError(f"duplicate request id {rid!r}")
        self._to_encode.append(prepared)

    def abort(self, request_id: str) -> bool:
        for p in self._to_encode:
            if p.request_id == request_id:
                self._to_encode.remove(p)
                return True
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._detok.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._to_encode) or self.scheduler.num_unfinished > 0

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.last_step_error = None
        failed = self._encode_pending()
        batch = self.scheduler.schedule()
        if batch is None:
            return failed
        try:
            self.faults.hit("forward")
            tokens = self.runner.execute(batch)
        except Exception as exc:  # noqa: BLE001 — end this step's requests, keep the engine going
            self.last_step_error = exc
            return failed + [self._fail(req) for req in batch.requests]
        return failed + self._postprocess(batch.requests, batch.num_new_tokens, tokens)

    def _fail(self, req: Request) -> RequestOutput:
        if req.request_id in self._requests:  # (not yet admitted requests are only in the scheduler)
            del self._requests[req.request_id], self._detok[req.request_id]
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)  # frees its blocks
        return RequestOutput(req.request_id, [], "", True, RequestStatus.FINISHED_ERROR.value, req.num_prompt_tokens,
                             len(req.output_token_ids))

    def _encode_pending(self) -> list[RequestOutput]:
        """Encode the new requests' media and queue them; the error outputs if the tower failed."""
        pending, self._to_encode = self._to_encode, []
        try:
            self._queue_encoded(pending)
        except Exception as exc:  # noqa: BLE001 — the tower failed: these requests end, nothing else
            self.last_step_error = exc
            return [RequestOutput(p.request_id, [], "", True, RequestStatus.FINISHED_ERROR.value,
                                  len(p.plan.prompt_token_ids)) for p in pending]
        return []

    def _queue_encoded(self, pending: list[PreparedRequest]) -> None:
        if any(p.media for p in pending):
            self.faults.hit("encode")
        # every item of every request; the runner batches them one tower forward per modality
        keys = [(p.request_id, i) for p in pending for i in range(len(p.media))]
        embeddings: dict[tuple[str, int], torch.Tensor] = dict(
            zip(keys, self.encoder.encode([m for p in pending for m in p.media])))
        for p in pending:
            slots = media_slots(p.plan.media_runs, [embeddings[(p.request_id, i)] for i in range(len(p.media))],
                                [m.content_hash for m in p.media])
            req = Request(p.request_id, p.plan.prompt_token_ids, p.sampling, slots, self.eos_token_ids,
                          mrope_positions=p.plan.mrope_positions, position_delta=p.plan.position_delta)
            self._requests[req.request_id] = req
            self._detok[req.request_id] = IncrementalDetokenizer(self.tokenizer, p.sampling.stop,
                                                               min_tokens=p.sampling.min_tokens)
            self.scheduler.add(req)

    def _postprocess(self, requests: list[Request], num_new: list[int], tokens: list[int | None]):
        outputs = []
        for req, n, tok in zip(requests, num_new, tokens):
            self.scheduler.mark_computed(req, n)  # (full blocks become shareable)
            if tok is None:
                continue
            req.append_token(tok)
            detok = self._detok[req.request_id]
            detok.push([tok])
            status = RequestStatus.FINISHED_STOPPED if detok.stopped else req.check_stop(self.max_model_len)
            if status is not None:
                self.scheduler.finish(req, status)
                del self._requests[req.request_id], self._detok[req.request_id]
            outputs.append(RequestOutput(
                req.request_id, [tok], detok.take(final=status is not None), status is not None,
                status.value if status else None, req.num_prompt_tokens, len(req.output_token_ids),
                req.output_logprobs[-1:] if req.sampling.logprobs is not None else None))
        return outputs

    # -- convenience for the CLI, tests and benchmarks ---------------------------------------
    def generate(self, prompts: list[tuple[str, list[MediaInput], SamplingParams]]) -> list[Completion]:
        """Run a set of requests to completion, all admitted at once (continuous batching)."""
        start = time.perf_counter()
        ids = [self.add_request(p, m, s) for p, m, s in prompts]
        state = {i: {"tokens": [], "text": [], "ttft": None, "logprobs": None} for i in ids}
        done: dict[str, Completion] = {}
        while self.has_unfinished():
            for out in self.step():
                st = state[out.request_id]
                st["tokens"] += out.new_token_ids
                st["text"].append(out.text)
                if out.logprobs is not None:
                    st["logprobs"] = (st["logprobs"] or []) + out.logprobs
                if st["ttft"] is None:
                    st["ttft"] = time.perf_counter() - start
                if out.finished:
                    e2e = time.perf_counter() - start
                    n = len(st["tokens"])
                    done[out.request_id] = Completion(
                        out.request_id, "".join(st["text"]), st["tokens"], out.finish_reason,
                        out.num_prompt_tokens, st["ttft"], (e2e - st["ttft"]) / max(n - 1, 1), e2e,
                        st["logprobs"])
        return [done[i] for i in ids]

    def stream(self, prompt: str, media: list[MediaInput] = (),
               sampling: SamplingParams = SamplingParams()) -> Iterator[RequestOutput]:
        rid = self.add_request(prompt, media, sampling)
        while self.has_unfinished():
            for out in self.step():
                if out.request_id == rid:
                    yield out
                    if out.finished:
                        return

    @property
    def kv_blocks_in_use(self) -> int:
        return self.blocks.num_used_blocks

