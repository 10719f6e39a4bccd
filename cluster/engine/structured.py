"""Structured outputs: grammars that constrain what a request may generate (llguidance, the
grammar engine vLLM also ships).

A request's ``response_format`` (``json_object`` / ``json_schema``) or vLLM's ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (Lark) is one
``SamplingParams.structured_output`` = (kind, value); the front door compiles it to an llguidance
grammar and checks it against the model's tokenizer (``check_structured_output``), so a bad schema
is INVALID_ARGUMENT before any worker. The worker that samples (prefill for the first token,
decode after) keeps one ``LLMatcher`` per request, made when the request is first sampled there
from the tokens it already has (a decode worker's first token, a re-prefill's tokens sent), so
migration and preemption continue the same grammar state. Each step the matchers of the
constrained rows fill one token bitmask, applied to the logits before sampling (greedy rows
too), then consume the sampled tokens. A finished grammar ends the request (``stop``).
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or grammar a client sends
MAX_CHOICES = 256  # guided_choice entries


class GrammarError(ValueError):
    """A grammar the client sent is malformed or unsupported (INVALID_ARGUMENT / 400)."""


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def compile_grammar(kind: str, value: str) -> str:
    """``SamplingParams.structured_output`` (kind, value) -> the llguidance grammar string.
    ``value``: a JSON schema (``json_schema``), ignored (``json_object``), a regex, a JSON list of
    strings (``choice``) or a Lark grammar (``grammar``). GrammarError when malformed."""
    import llguidance

    if kind not in STRUCTURED_KINDS:
        raise GrammarError(f"structured output kind {kind[:40]!r} is not one of {', '.join(STRUCTURED_KINDS)}")
    if len(value) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the structured-output constraint is over {MAX_GRAMMAR_CHARS} characters")
    try:
        if kind == "choice":
            choices = json.loads(value)
            if (not isinstance(choices, list) or not 0 < len(choices) <= MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in choices)):
                raise GrammarError(f"guided_choice must be 1..{MAX_CHOICES} non-empty strings")
            return llguidance.grammar_from("lark", "start: " + " | ".join(json.dumps(c) for c in choices))
        if kind in ("json_schema", "json_object"):
            schema = value if kind == "json_schema" else '{"type": "object"}'
            if not isinstance(json.loads(schema), (dict, bool)):
                raise GrammarError("a JSON schema must be an object")
            # one space after ":" and ",", no other whitespace: small models otherwise loop on blank runs
            # (vLLM's disable_any_whitespace)
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
        return llguidance.grammar_from("regex" if kind == "regex" else "lark", value)
    except GrammarError:
        raise
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid structured-output constraint: {str(exc)[:200]}") from None


@lru_cache(maxsize=4)
def ll_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """The llguidance view of a Hugging Face tokenizer (built once per process and model)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids) or None)


def check_structured_output(spec: tuple[str, str], tokenizer, vocab_size: int) -> None:
    """The front door's check: the constraint compiles and is valid for this tokenizer."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(compile_grammar(*spec), ll_tokenizer(tokenizer, vocab_size, ()))
    if error:
        raise GrammarError(f"invalid structured-output constraint: {error[:300]}")


class GrammarState:
    """One request's matcher on the worker that samples it."""

    def __init__(self, spec: tuple[str, str], tokenizer, vocab_size: int, eos_ids: tuple[int, ...],
                 tokens: list[int]):
        import llguidance

        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size, eos_ids), compile_grammar(*spec))
        if tokens and not self.matcher.consume_tokens(tokens):
            raise GrammarError(f"the tokens so far do not match the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    def advance(self, token_id: int) -> None:
        if not self.matcher.is_stopped() and not self.matcher.consume_token(token_id):
            raise GrammarError(f"token {token_id} breaks the grammar: {self.matcher.get_error()}")


def apply_grammars(logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> torch.Tensor:
    """Mask ``logits`` rows ``rows`` to the tokens each grammar allows next (a copy)."""
    import llguidance.torch as lt

    bitmask = lt.allocate_token_bitmask(len(rows), logits.shape[-1])
    for i, state in enumerate(states):
        lt.fill_next_token_bitmask(state.matcher, bitmask, i)
    sub = logits[rows].float().contiguous()
    lt.apply_token_bitmask_inplace(sub, bitmask.to(sub.device))
    out = logits.float().clone()
    out[rows] = sub
    return out
