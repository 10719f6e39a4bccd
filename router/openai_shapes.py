"""The OpenAI API's response bodies for one request's choices: chat completions and text
completions, whole (``full``) or as SSE chunks (``opening``, ``text``, ``usage``), with their
logprobs in OpenAI's shapes (chat ``logprobs.content``; the legacy completions ``tokens`` /
``token_logprobs`` / ``top_logprobs`` / ``text_offset``). Used by ``router.http_server``."""

from __future__ import annotations

import time

from router import openai_protocol as oa
from router.events import FinalEvent


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


class ChatShape:
    def __init__(self, rid: str, model: str, tokenizer):
        self.id, self.model, self.created = f"chatcmpl-{rid}", model, int(time.time())
        self.tokenizer = tokenizer

    def opening(self, index: int = 0) -> dict | None:
        return self.chunk({"role": "assistant", "content": ""}, index=index)

    def chunk(self, delta: dict, finish: str | None = None, logprobs: list | None = None, index: int = 0) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                             "logprobs": self.logprobs(logprobs)}], "usage": None}

    def text(self, text: str, finish: str | None = None, token_ids=(), logprobs: list | None = None,
             index: int = 0) -> dict:
        return self.chunk({"content": text} if text else {}, finish, logprobs and list(zip(token_ids, logprobs)),
                          index)

    def logprobs(self, pairs: list | None) -> dict | None:
        """OpenAI's chat shape of (token id, (logprob, top)) pairs."""
        if pairs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            token = token_text(self.tokenizer, token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in top]}
                            for t, (lp, top) in pairs], "refusal": None}

    def usage(self, usage: oa.UsageInfo) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage.model_dump()}

    def full(self, results: list[tuple], usage: oa.UsageInfo) -> oa.ChatCompletion:
        """``results``: per choice (text, final event, token ids, logprobs) (``_collect``)."""
        return oa.ChatCompletion(id=self.id, model=self.model, usage=usage, choices=[
            oa.ChatChoice(index=i, message=oa.AssistantMessage(content=text), finish_reason=final.finish_reason,
                          logprobs=self.logprobs(logprobs and list(zip(token_ids, logprobs))))
            for i, (text, final, token_ids, logprobs) in enumerate(results)])


class TextShape:
    def __init__(self, rid: str, model: str, tokenizer):
        self.id, self.model, self.created = f"cmpl-{rid}", model, int(time.time())
        self.tokenizer = tokenizer
        self.offsets: dict[int, int] = {}  # per choice, characters of its token texts so far (text_offset)

    def opening(self, index: int = 0) -> None:
        return None

    def text(self, text: str, finish: str | None = None, token_ids=(), logprobs: list | None = None,
             index: int = 0) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "finish_reason": finish,
                             "logprobs": self.logprobs(token_ids, logprobs, index)}], "usage": None}

    def logprobs(self, token_ids, logprobs: list | None, index: int = 0) -> dict | None:
        """The legacy completions shape: tokens, their logprobs, {token: logprob} alternatives and
        each token's character offset in the completion."""
        if logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, (lp, top) in zip(token_ids, logprobs):
            token = token_text(self.tokenizer, token_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({token_text(self.tokenizer, a): v for a, v in top})
            out["text_offset"].append(self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + len(token)
        return out

    def usage(self, usage: oa.UsageInfo) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage.model_dump()}

    def full(self, results: list[tuple], usage: oa.UsageInfo) -> oa.Completion:
        return oa.Completion(id=self.id, model=self.model, usage=usage, choices=[
            oa.CompletionChoice(index=i, text=text, finish_reason=final.finish_reason,
                                logprobs=self.logprobs(token_ids, logprobs, i))
            for i, (text, final, token_ids, logprobs) in enumerate(results)])


def usage_of(finals: list[FinalEvent]) -> oa.UsageInfo:
    """The prompt once, the completions of every choice."""
    prompt = finals[0].usage.prompt_tokens
    completion = sum(f.usage.completion_tokens for f in finals)
    return oa.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
