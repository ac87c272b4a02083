"""Token log-probabilities in each route's JSON shape (the engine hands out TokenLogprob entries).

    /v1/completions       {"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}
    /v1/chat/completions  {"content": [{"token", "logprob", "bytes", "top_logprobs": [{...}]}]}
    /generate             [{"token_id", "token", "logprob", "top_logprobs": [{"token_id", "token", "logprob"}]}]

A token's text is its own decode. Byte-level tokens that hold part of a UTF-8 character decode to U+FFFD on
their own; chat's `bytes` field is that text's UTF-8 (what OpenAI-compatible servers commonly send), not the
token's raw bytes.
"""
from __future__ import annotations

from functools import lru_cache

from model_runner.sampler import TokenLogprob
from model_runner.text import decode


class TokenTexts:
    """token id -> text, cached: a vocabulary's few thousand common tokens are decoded once per server."""

    def __init__(self, tokenizer):
        self._decode = lru_cache(maxsize=1 << 16)(lambda t: decode(tokenizer, [t], skip_special_tokens=False))

    def __call__(self, token_id: int) -> str:
        return self._decode(token_id)


def completion_logprobs(text: TokenTexts, token_ids: list[int], entries: list[TokenLogprob | None],
                        offset: int = 0) -> dict:
    """OpenAI completions' shape. `top_logprobs` holds the N likeliest and the chosen token ("up to logprobs + 1
    elements", as OpenAI documents); a prompt's first token has null entries. text_offset counts characters
    from `offset`, the position of the first token in the returned text."""
    tokens = [text(t) for t in token_ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens,
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [({text(i): lp for i, lp in e.top} | {text(e.token_id): e.logprob}) if e else None
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(text: TokenTexts, entries: list[TokenLogprob]) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        s = text(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}
    return {"content": [one(e.token_id, e.logprob) | {"top_logprobs": [one(i, lp) for i, lp in e.top]}
                        for e in entries]}


def generate_logprobs(text: TokenTexts, entries: list[TokenLogprob | None]) -> list[dict | None]:
    def one(token_id: int, logprob: float) -> dict:
        return {"token_id": token_id, "token": text(token_id), "logprob": logprob}
    return [one(e.token_id, e.logprob) | {"top_logprobs": [one(i, lp) for i, lp in e.top]} if e else None
            for e in entries]
