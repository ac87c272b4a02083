"""Request bodies -> (prompt, SamplingParams), with a clear 4xx for anything wrong.

Hand-written checks rather than a schema library: the fields are few, and each message can say exactly
which field is wrong and what it accepts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from model_runner.errors import InvalidRequestError
from model_runner.sampling_params import SamplingParams

from .errors import APIError, invalid

_MISSING = object()


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


def field(body: dict, name: str, kind: type | tuple, default: Any = _MISSING, *, lo=None, hi=None) -> Any:
    """body[name], checked for type (bool is not an int here) and range."""
    value = body.get(name)
    if value is None:  # absent or an explicit null: the default, as OpenAI's API reads it
        if default is _MISSING:
            raise invalid(f"'{name}' is required", "missing_field")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise invalid(f"'{name}' must be {names}, got {type(value).__name__}", "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(f"'{name}' must be a finite number")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise invalid(f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise invalid("'stop' must be a non-empty string or a list of at most 16 non-empty strings", "invalid_type")
    return tuple(stop)


def sampling_params(body: dict, default_max_tokens: int) -> SamplingParams:
    """The sampling fields shared by /generate and the OpenAI routes (greedy unless a temperature is given)."""
    top_k = field(body, "top_k", int, 0, lo=-1)
    params = SamplingParams(
        max_tokens=field(body, "max_tokens", int, default_max_tokens, lo=1) or default_max_tokens,
        temperature=field(body, "temperature", float, 0.0, lo=0.0, hi=2.0) or 0.0,
        top_p=field(body, "top_p", float, 1.0, lo=0.0, hi=1.0),
        top_k=0 if top_k == -1 else top_k,
        seed=field(body, "seed", int, None, lo=0, hi=2**63 - 1),
        repetition_penalty=field(body, "repetition_penalty", float, 1.0, lo=0.0, hi=10.0),
        stop=stop_strings(body),
        stop_token_ids=tuple(field(body, "stop_token_ids", list, [])),
        ignore_eos=field(body, "ignore_eos", bool, False),
        min_tokens=field(body, "min_tokens", int, 0, lo=0),
    )
    try:
        return params.validate()
    except InvalidRequestError as e:
        raise invalid(str(e)) from None


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool = False


def encodable(text: str, name: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"); no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{name}' contains a lone surrogate (invalid Unicode); send valid UTF-8 text") from None
    return text


def prompt_ids(body: dict, tokenizer, name: str = "prompt") -> list[int]:
    """A prompt given as text, or as token ids (OpenAI allows both); a one-element list is unwrapped."""
    prompt = body.get(name, _MISSING)
    if prompt is _MISSING or prompt is None:
        raise invalid(f"'{name}' is required", "missing_field")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer(encodable(prompt, name), add_special_tokens=False)["input_ids"] if prompt else []
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise invalid(f"'{name}' must be a string, a list of token ids, or a one-element list of either "
                  "(batched prompts are not supported: send one request per prompt)", "invalid_type")


def chat_prompt_ids(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of {role, content} objects", "missing_field")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise invalid(f"messages[{i}] must have a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid(f"messages[{i}].content parts must be text parts (images are not supported)")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string")
        clean.append({"role": m["role"], "content": encodable(content, f"messages[{i}].content")})
    if not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
    return tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def check_n(body: dict) -> None:
    if field(body, "n", int, 1) != 1:
        raise invalid("only n=1 is supported: send several requests for several completions", "unsupported")
    if body.get("logprobs") not in (None, False, 0) or body.get("best_of") not in (None, 1):
        raise invalid("logprobs and best_of are not supported", "unsupported")
