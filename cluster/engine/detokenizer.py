"""Incremental detokenization with stop strings, one instance per request.

Text is produced the way vLLM does it: decode a short window of recent tokens and emit only
what the newest token added, holding back while the tail is an incomplete UTF-8 sequence
(``\ufffd``). With stop strings, the last ``max(len(stop)) - 1`` characters are held back too, so
a client never receives the beginning of a stop string that later completes; the match itself is
cut from the output (the text ends right before it).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # all output text so far (truncated at a stop string once matched)
        self.num_sent = 0  # characters of ``text`` already returned to the caller
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: list[int]) -> None:
        """Add generated tokens; sets ``stopped`` when a stop string appears."""
        if self.stopped:
            return
        for tok in token_ids:
            self.token_ids.append(tok)
            prefix = self._decode(self.token_ids[self._prefix_offset: self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset:])
            if len(full) <= len(prefix) or full.endswith("\ufffd"):
                continue
            search_from = max(0, len(self.text) - self.holdback)
            self.text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            if self.stop and self._match_stop(search_from):
                return

    def _match_stop(self, search_from: int) -> bool:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return bool(hits)

    def take(self, final: bool = False) -> str:
        """Return the text not yet returned; keeps a possible stop-string prefix unless final."""
        limit = len(self.text) if (final or self.stopped) else max(self.num_sent, len(self.text) - self.holdback)
        delta = self.text[self.num_sent: limit]
        self.num_sent = limit
        return delta
