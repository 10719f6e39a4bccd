"""``DecodeSink``: one request's decode phase in the router, fed straight from its worker's token
stream (``router.token_streams``): detokenize the new tokens, cut at a stop string, emit one
``TokenEvent`` per delta, and resolve ``done`` with the finish when the request ends.

All of it runs in the stream's data callback, so a token reaches the request's event queue
without waking the request's driver task; the driver only awaits ``done``.
"""

from __future__ import annotations

import asyncio
import time

from cluster.engine.detokenizer import IncrementalDetokenizer
from router.events import TokenEvent, WorkerUnavailableError


class DecodeSink:
    def __init__(self, st, timings: dict, worker_name: str, detok: IncrementalDetokenizer, tokens: list[int], emit,
                 hold: bool = False):
        self.st = st  # router.request_stream.RequestState
        self.t = timings  # the driver's stage clock (monotonic stamps, see RouterCore._final)
        self.worker_name = worker_name  # "decode worker decode-0", for errors
        self.detok = detok
        self.tokens = tokens  # every token streamed to the client so far (the driver's list)
        self.emit = emit
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()  # -> (finish_reason, message)
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())  # (retrieved even if unawaited)
        # hold: outputs are kept until release() (decode started before the first token, which
        # the driver emits, reached the router)
        self._held: list[tuple] | None = [] if hold else None

    def release(self) -> None:
        """Pass on what was held, in order, and everything from now on."""
        held, self._held = self._held or [], None
        for args in held:
            self.push(*args)

    def push(self, token_ids: list[int], finish_reason: str | None, logprobs: list | None = None) -> None:
        if self._held is not None:
            self._held.append((token_ids, finish_reason, logprobs))
            return
        if self.done.done():
            return  # finished here (a stop string): the worker's abort is on its way
        now = time.monotonic()
        t, st, detok = self.t, self.st, self.detok
        if "first" not in t and token_ids:  # colocated: the first delta holds the first token
            t["first"] = t["decode"] = now
            t["prefill_s"] = now - t["prefill"]
        stopped = False
        num_new = 0
        for tok in token_ids:  # one at a time: a stop string cuts the rest off
            self.tokens.append(tok)
            num_new += 1
            detok.push((tok,))
            if detok.stopped:
                stopped = True
                break
        # A failed step sends "error" and no token, but a stream that fell behind merges steps
        # (step_stream.merge_deltas): the tokens of the steps before the failure arrive with it.
        # They were made, so they reach the client before the failure: the migration continues
        # after them (``tokens``), and a token counted there but never emitted would be lost.
        failed = not stopped and finish_reason == "error"
        finished = stopped or (finish_reason is not None and not failed)
        text = detok.take(final=finished)
        if num_new or text:
            new_tokens = token_ids if num_new == len(token_ids) else token_ids[:num_new]
            self.emit(TokenEvent(list(new_tokens), text, None if logprobs is None else list(logprobs[:num_new])))
            if st.num_tokens_sent == 0:
                t["ttft"] = now
            st.num_tokens_sent += num_new
        if failed:
            self.done.set_exception(WorkerUnavailableError(f"{self.worker_name} failed the request"))
        elif finished:
            t["last"] = now
            st.decode_done = finish_reason is not None  # the worker ended it itself; else cleanup aborts it there
            self.done.set_result(("stop", "") if stopped else (finish_reason, ""))

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
