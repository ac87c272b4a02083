"""Request bodies -> (prompt, SamplingParams), with a clear 4xx for anything wrong.

Every field a route accepts is declared once, in api/fields.py's tables (name, type, bounds, what it does; the
sampling bounds come from model_runner.sampling_params.BOUNDS, which the engine checks too): the checks here read
them, and so does the OpenAPI document (api/openapi.py), so the published contract cannot drift from the code. A
field no table names is refused (400, "not supported"): a client that sends `tools` or `functions` learns at once
that it will not get them, instead of getting an answer that silently lacks them.

Status codes: 400 for a body that is not JSON, a field this server does not support, or a request that
cannot fit the context window; 422 for a known field with a wrong type or a value out of its bounds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from model_runner import context_window
from model_runner.errors import ContextLengthExceeded
from model_runner.sampling_params import LOGIT_BIAS, SamplingParams
from model_runner.text import encode

from .errors import APIError, invalid
from .fields import (LOGPROB_PRODUCT, MAX_LOGIT_BIAS, MAX_LOGPROB_ENTRIES, MAX_MESSAGES, MAX_PARTS, MAX_STOP,
                     MAX_STOP_CHARS, ROUTE_FIELDS, ROUTE_RULES, UNSUPPORTED, Field, as_int)
from .offload import ByteBound


def check_rules(body: dict, route: str) -> None:
    for rule in ROUTE_RULES[route]:
        if rule.applies(body) and not rule.holds(body):
            raise APIError(rule.status, rule.message, code=rule.code)


def _bounds(f: Field) -> str:
    lo = f"{'>' if f.open_lo else '>='} {f.lo:g}" if f.lo is not None else None
    if f.lo is not None and f.hi is not None:
        return f"in {'(' if f.open_lo else '['}{f.lo:g}, {f.hi:g}]"
    return lo or (f"<= {f.hi:g}" if f.hi is not None else "")


_BY_NAME = {route: {f.name: f for f in fields} for route, fields in ROUTE_FIELDS.items()}


def check_fields(body: dict, route: str) -> None:
    """Refuses (400) any field the route does not accept, unless it is a known unsupported field set to off."""
    accepted = _BY_NAME[route]
    for name, value in body.items():
        if name in accepted or value is None:
            continue
        if name in UNSUPPORTED:
            if any(value == off and isinstance(value, bool) == isinstance(off, bool) for off in UNSUPPORTED[name]):
                continue
            raise APIError(400, f"'{name}' is not supported by this server; leave it out (accepted on {route}: "
                                f"{', '.join(sorted(accepted))})", code="unsupported_field")
        raise APIError(400, f"'{name[:100]}' is not supported on {route}: it is not a field this server knows "
                            f"(accepted: {', '.join(sorted(accepted))})", code="unsupported_field")


def spec(route: str, name: str) -> Field:
    return _BY_NAME[route][name]  # a dict: about fourteen look-ups a request


def value(body: dict, f: Field, default: Any = None, hi: float | None = None) -> Any:
    """body[f.name] for a scalar field, checked for type (bool is not a number here) and bounds; null = default.
    hi, when given, tightens the field's upper bound (a bound that depends on the model)."""
    v = body.get(f.name)
    if v is None:
        return f.default if default is None else default
    if f.kind == "integer":
        v = as_int(v)
    if v is None or not isinstance(v, _KINDS[f.kind]) or (isinstance(v, bool) and f.kind != "boolean"):
        v = body[f.name]
        raise invalid(f"'{f.name}' must be {'an' if f.kind == 'integer' else 'a'} {f.kind}, got "
                      f"{_json_type(v)}", "invalid_type")
    if f.kind == "string":
        if f.hi is not None and len(v) > f.hi:
            raise invalid(f"'{f.name}' must be at most {f.hi:g} characters, got {len(v)}")
        return encodable(v, f.name)
    if f.kind == "number":
        v = float(v)
        if not math.isfinite(v):
            raise invalid(f"'{f.name}' must be a finite number")
    if f.kind in ("integer", "number"):
        hi = f.hi if hi is None else hi if f.hi is None else min(f.hi, hi)
        if (f.lo is not None and (v <= f.lo if f.open_lo else v < f.lo)) or (hi is not None and v > hi):
            bounded = Field(f.name, f.kind, f.doc, f.lo, hi, f.open_lo)
            raise invalid(f"'{f.name}' must be {_bounds(bounded)}, got {v}")
    return v


_KINDS = {"integer": int, "number": (int, float), "boolean": bool, "string": str}  # value()'s scalar kinds


def _json_type(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def encodable(text: str, name: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"); no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{name}' contains a lone surrogate (invalid Unicode); send valid UTF-8 text") from None
    return text


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise invalid(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings of "
                      f"at most {MAX_STOP_CHARS} characters", "invalid_type")
    return tuple(encodable(s, "stop") for s in stop)


def token_ids(body: dict, name: str, vocab_size: int, most: int) -> list[int]:
    ids = body.get(name)
    if ids is None:
        return []
    if not isinstance(ids, list) or len(ids) > most or None in (ids := [as_int(t) for t in ids]):
        raise invalid(f"'{name}' must be a list of at most {most} token ids (integers)", "invalid_type")
    if bad := [t for t in ids if not 0 <= t < vocab_size]:
        raise invalid(f"'{name}' holds {bad[0]}, outside the vocabulary (0..{vocab_size - 1})")
    return ids


def logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} (JSON keys are strings) as (id, bias) pairs, each checked."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise invalid(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} entries "
                      "{\"token id\": bias}", "invalid_type")
    pairs = []
    for key, b in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10) or int(key) >= vocab_size:
            raise invalid(f"'logit_bias' keys must be token ids in 0..{vocab_size - 1}, got {key[:20]!r}")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not LOGIT_BIAS.holds(b):
            raise invalid(f"'logit_bias' values must be numbers {LOGIT_BIAS}; token {key} has {str(b)[:40]}")
        pairs.append((int(key), float(b)))
    return tuple(pairs)


@dataclass
class Model:
    """What the checks need to know of the served model."""
    max_model_len: int
    vocab_size: int
    byte_bound: ByteBound | None = None  # what a text's size alone proves of its tokens (api/offload.py)


def sampling_params(body: dict, route: str, model: Model, prompt_len: int, default_max_tokens: int,
                    n: int = 1) -> SamplingParams:
    """The sampling fields shared by every generating route (greedy unless a temperature is given).

    max_tokens beyond what the context leaves after the prompt is refused (400, with both numbers), never
    quietly cut; a default max_tokens (the client gave none) is lowered to fit instead. So with the bound on
    logprob entries (MAX_LOGPROB_ENTRIES), with n samples."""
    room = context_window.room(prompt_len, model.max_model_len)
    max_tokens = value(body, spec(route, "max_tokens"), hi=model.max_model_len - 1)  # a prompt holds >= 1 token
    logprobs, prompt_logprobs = logprob_fields(body, route, max_tokens)
    if max_tokens is not None:  # (a prompt too long for the window is the engine's refusal, at submission)
        try:
            context_window.check_max_tokens_fit(prompt_len, max_tokens, model.max_model_len)
        except ContextLengthExceeded as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
    if max_tokens is None:
        fits = room if logprobs is None else (MAX_LOGPROB_ENTRIES - logprob_entries(
            route, n, prompt_len, 0, logprobs, prompt_logprobs)) // (n * (1 + logprobs))
        max_tokens = max(1, min(default_max_tokens, room, fits))
    if (entries := logprob_entries(route, n, prompt_len, max_tokens, logprobs, prompt_logprobs)) > MAX_LOGPROB_ENTRIES:
        given = {"n": n, "max_tokens": max_tokens, "prompt tokens": prompt_len, "logprobs": logprobs,
                 "top_logprobs": logprobs, "prompt_logprobs": prompt_logprobs}
        named = [k for k in given if re.search(rf"(?<![\w_]){k}(?![\w_])", LOGPROB_PRODUCT[route])]
        raise invalid(f"this answer would hold {entries:,} logprob entries ({LOGPROB_PRODUCT[route]}, with "
                      f"{', '.join(f'{k} {given[k]}' for k in named)}); at most {MAX_LOGPROB_ENTRIES:,} are "
                      f"allowed: lower {', '.join(k for k in named if k != 'prompt tokens')}", "too_many_logprobs")
    top_k = value(body, spec(route, "top_k"))
    min_tokens = value(body, spec(route, "min_tokens"), hi=model.max_model_len - 1)
    if min_tokens > max_tokens:
        raise invalid(f"'min_tokens' must be at most max_tokens ({max_tokens}), got {min_tokens}")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=value(body, spec(route, "temperature")),
        top_p=value(body, spec(route, "top_p")),
        top_k=0 if top_k == -1 else top_k,
        seed=value(body, spec(route, "seed")),
        repetition_penalty=value(body, spec(route, "repetition_penalty")),
        stop=stop_strings(body),
        stop_token_ids=tuple(token_ids(body, "stop_token_ids", model.vocab_size, MAX_STOP)),
        ignore_eos=value(body, spec(route, "ignore_eos")),
        min_tokens=min_tokens,
        presence_penalty=value(body, spec(route, "presence_penalty")),
        frequency_penalty=value(body, spec(route, "frequency_penalty")),
        logit_bias=logit_bias(body, model.vocab_size),
        min_p=value(body, spec(route, "min_p")),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    return params  # validated by the engine, its one owner (an error there is a 422 too: api/routes.py submit)


def logprob_entries(route: str, n: int, prompt_len: int, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None) -> int:
    """The logprob entries an answer holds (LOGPROB_PRODUCT): every token's own and its top alternatives."""
    if route == "/v1/completions" and logprobs is None:
        prompt_logprobs = None  # echo without logprobs: the prompt is scored but its logprobs are not sent
    return n * (0 if logprobs is None else max_tokens * (1 + logprobs)) \
        + n * (0 if prompt_logprobs is None else prompt_len * (1 + prompt_logprobs))


def logprob_fields(body: dict, route: str, max_tokens: int | None) -> tuple[int | None, int | None]:
    """(logprobs, prompt_logprobs) for SamplingParams from each route's own way of asking for them (max_tokens 0
    without a way to score the prompt is refused by RULES)."""
    if route == "/generate":
        return value(body, spec(route, "logprobs")), value(body, spec(route, "prompt_logprobs"))
    if route == "/v1/completions":
        n, echo = value(body, spec(route, "logprobs")), value(body, spec(route, "echo"))
        # Echo + logprobs scores the prompt too; echo alone with max_tokens 0 still needs a prompt pass to end.
        return n, (n if echo and n is not None else 0 if echo and max_tokens == 0 else None)
    top = value(body, spec(route, "top_logprobs"))
    if not value(body, spec(route, "logprobs")):  # top_logprobs > 0 without it: RULES
        return None, None
    return top or 0, None


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool = False
    echo: bool = False  # completions: the prompt's text (and logprobs) come first
    echo_text: str = ""
    n: int = 1          # parallel samples (OpenAI's n), one choice each


def prompt_ids(body: dict, tokenizer, name: str = "prompt", model: Model | None = None) -> list[int]:
    """A prompt given as text, or as token ids (OpenAI allows both); a one-element list is unwrapped.
    Special-token text in a text prompt is read as the special token: completions are raw text by design.
    Given the model, a text too long for its context window is refused before it is tokenized."""
    prompt = body.get(name)
    if prompt is None:
        raise invalid(f"'{name}' is required", "missing_field")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        text = encodable(prompt, name)
        if model is not None:
            check_text_size(text, model, "the prompt")
        return encode(tokenizer, text) if text else []
    if isinstance(prompt, list) and None not in (ids := [as_int(t) for t in prompt]):
        return ids
    raise invalid(f"'{name}' must be a string, a list of token ids, or a one-element list of either "
                  "(batched prompts are not supported: send one request per prompt)", "invalid_type")


def check_text_size(text: str, model: Model, what: str) -> None:
    """Bytes before tokens: a text whose size alone proves it holds more tokens than the context window (see
    api/offload.py's ByteBound) is refused (400, like the engine's own check of a long prompt) before it is
    tokenized, which takes seconds for a megabyte."""
    bound = model.byte_bound
    # A character is at most 4 bytes: a text this short cannot reach the bound, and needs no count at all.
    if bound is None or 4 * len(text) <= bound.token_bytes * (model.max_model_len - 1):
        return
    if context_window.room(least := bound.min_tokens(text), model.max_model_len) <= 0:  # the engine's rule, early
        raise APIError(400, f"{what} is {len(text.encode('utf-8')):,} bytes, so at least {least:,} tokens (no "
                            f"token of this model stands for more than {bound.token_bytes} bytes), and the context "
                            f"window is {model.max_model_len:,} tokens: shorten it", code="invalid_prompt")


def chat_messages(body: dict) -> list[dict[str, str]]:
    """'messages' checked and flattened to [{role, content: str}] (OpenAI's text content parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of {role, content} objects", "missing_field")
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"'messages' holds {len(messages)} turns; at most {MAX_MESSAGES} are accepted")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise invalid(f"messages[{i}] must have a role of system, user or assistant")
        if extra := {k for k, v in m.items() if v is not None} - {"role", "content"}:
            raise APIError(400, f"messages[{i}].{sorted(extra)[0][:100]} is not supported (names, tool calls and "
                                "other message fields are not implemented)", code="unsupported_field")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if len(content) > MAX_PARTS or not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                    and set(p) <= {"type", "text"} for p in content):
                raise invalid(f"messages[{i}].content parts must be at most {MAX_PARTS} text parts "
                              "(images and other parts are not supported)")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of text parts")
        clean.append({"role": m["role"], "content": encodable(content, f"messages[{i}].content")})
    return clean
