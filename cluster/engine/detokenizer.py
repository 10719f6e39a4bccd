"""Incremental detokenization with stop strings, one instance per request; O(1) work per token.

Text comes from the tokenizer's own streaming decoder where it has one (``tokenizers``'
``DecodeStream``, in Rust: each token is decoded once, holding back an incomplete UTF-8 sequence
until it completes), and otherwise from a short window of recent tokens, decoded twice per token
(vLLM's scheme: emit what the newest token added, wait while the tail is ``\\ufffd``). Both give
exactly ``tokenizer.decode(all_ids)``, piece by piece. A tokenizer that post-processes whole
strings (``clean_up_tokenization_spaces``) takes the window path, which applies it.

Stop strings: the last ``max(len(stop)) - 1`` characters are held back, so a client never
receives the beginning of a stop string that later completes; the match itself is cut from the
output (the text ends right before it). Only text not yet returned is searched, and only from
where a new match can start, so a long output costs no more per token than a short one.
"""

from __future__ import annotations


class _WindowDecoder:
    """Decode a sliding window of recent tokens (any tokenizer)."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []  # tokens from the window's start on
        self.read_offset = 0  # ids[:read_offset] were already turned into text

    def step(self, token_id: int) -> str | None:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[:self.read_offset], skip_special_tokens=self.skip)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # nothing new yet, or an incomplete UTF-8 sequence
        self.ids = self.ids[self.read_offset:]  # the window restarts where the new text began
        self.read_offset = len(self.ids)
        return full[len(prefix):]


class _StreamDecoder:
    """``tokenizers.decoders.DecodeStream`` over the fast tokenizer's backend."""

    def __init__(self, backend, skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self.backend, self.stream = backend, DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str | None:
        return self.stream.step(self.backend, token_id)


def _decoder(tokenizer, skip_special_tokens: bool):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        try:
            return _StreamDecoder(backend, skip_special_tokens)
        except ImportError:  # tokenizers < 0.21
            pass
    return _WindowDecoder(tokenizer, skip_special_tokens)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True, min_tokens: int = 0):
        self.stop = stop
        self.min_tokens = min_tokens  # no stop string ends the output before this many tokens (vLLM)
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self._decoder = _decoder(tokenizer, skip_special_tokens)
        self._unsent = ""  # text produced and not yet returned by ``take``
        self.num_tokens = 0
        self.stopped = False

    def push(self, token_ids: list[int]) -> None:
        """Add generated tokens; sets ``stopped`` when a stop string appears."""
        for tok in token_ids:
            if self.stopped:
                return
            self.num_tokens += 1
            piece = self._decoder.step(tok)
            if not piece:
                continue
            search_from = max(0, len(self._unsent) - self.holdback)  # a match must end in the new piece
            self._unsent += piece
            if self.stop and self.num_tokens >= self.min_tokens:
                self._match_stop(search_from)

    def _match_stop(self, search_from: int) -> None:
        hits = [i for i in (self._unsent.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self._unsent = self._unsent[: min(hits)]
            self.stopped = True

    def take(self, final: bool = False) -> str:
        """Return the text not yet returned; keeps a possible stop-string prefix unless final."""
        if final or self.stopped or not self.holdback:
            delta, self._unsent = self._unsent, ""
            return delta
        keep = min(self.holdback, len(self._unsent))
        delta, self._unsent = self._unsent[: len(self._unsent) - keep], self._unsent[len(self._unsent) - keep:]
        return delta
