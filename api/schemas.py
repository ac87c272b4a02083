"""Request bodies -> (prompt, SamplingParams), with a clear 4xx for anything wrong.

Every field a route accepts is declared once, in the tables below (name, type, bounds, what it does; the
sampling bounds come from model_runner.sampling_params.BOUNDS, which the engine checks too): the checks read
them, and so does the OpenAPI document (api/openapi.py), so the published contract cannot drift from the code. A field no table names is refused (400, "not supported"): a client that sends `tools` or
`functions` learns at once that it will not get them, instead of getting an answer that silently lacks them.

Status codes: 400 for a body that is not JSON, a field this server does not support, or a request that
cannot fit the context window; 422 for a known field with a wrong type or a value out of its bounds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from model_runner.sampling_params import BOUNDS, GRAMMAR_EXCLUDES, LOGIT_BIAS, SamplingParams, grammar_excludes
from model_runner import context_window
from model_runner.errors import ContextLengthExceeded
from model_runner.text import encode
from batcher.engine import MAX_N

from .errors import APIError, invalid
from .offload import ByteBound

MAX_STOP = 16             # stop strings, and stop token ids, per request
MAX_STOP_CHARS = 256      # characters in one stop string
MAX_MESSAGES = 1024       # chat turns per request
MAX_PARTS = 64            # content parts per message
MAX_NAME_CHARS = 256      # model, user
MAX_LOGIT_BIAS = 300      # logit_bias entries per request (OpenAI's own limit)
# Logprob entries in one answer (a token's own, or one of its top alternatives): each is a JSON object of about
# 60 bytes, so an answer holds at most about 8 MB of them. Without a bound n, echo, max_tokens and logprobs
# multiply a small request into an answer a thousand times its size. Each route's product, as its fields say:
MAX_LOGPROB_ENTRIES = 1 << 17
LOGPROB_PRODUCT = {"/generate": "max_tokens × (1 + logprobs) + prompt tokens × (1 + prompt_logprobs)",
                   "/v1/completions": "n × (max_tokens + prompt tokens if echo) × (1 + logprobs)",
                   "/v1/chat/completions": "n × max_tokens × (1 + top_logprobs)"}


def _entries_doc(route: str) -> str:
    return (f"; {LOGPROB_PRODUCT[route]} must be at most {MAX_LOGPROB_ENTRIES:,} logprob entries (422 "
            "too_many_logprobs; a default max_tokens is lowered to fit)")


@dataclass(frozen=True)
class Field:
    """One accepted body field. kind is a JSON Schema type, or one of the shapes checked by its own function
    (prompt, messages, stop, token_ids, stream_options). Bounds are inclusive unless open_lo."""
    name: str
    kind: str
    doc: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    default: Any = None


MAX_TOKENS = Field("max_tokens", "integer", "tokens to generate at most; prompt + max_tokens must fit the context "
                   "window (400 otherwise)", lo=1)
SAMPLING = (
    MAX_TOKENS,
    Field("temperature", "number", "0 = greedy; higher samples more freely", *BOUNDS["temperature"], default=0.0),
    Field("top_p", "number", "nucleus sampling: the smallest set of tokens holding this much probability",
          *BOUNDS["top_p"], default=1.0),
    Field("top_k", "integer", "sample among the k likeliest tokens; 0 or -1 = off", *BOUNDS["top_k"],
          default=0),
    Field("seed", "integer", "makes a sampled request reproducible, whatever shares its batch",
          *BOUNDS["seed"]),
    Field("repetition_penalty", "number", "> 1 discourages tokens already seen (prompt and output), < 1 "
          "encourages them; 1 = off", *BOUNDS["repetition_penalty"], default=1.0),
    Field("stop", "stop", f"a string or up to {MAX_STOP} strings (1..{MAX_STOP_CHARS} characters each) that end "
          "the output; the stop string itself is not returned"),
    Field("stop_token_ids", "token_ids", f"up to {MAX_STOP} token ids that end the output"),
    Field("ignore_eos", "boolean", "keep generating past end-of-sequence tokens", default=False),
    Field("min_tokens", "integer", "end-of-sequence and stop tokens cannot be sampled until this many tokens are "
          "out (at most max_tokens)", lo=0, default=0),
    Field("presence_penalty", "number", "subtracted from the logit of every token already generated (OpenAI's "
          "penalty; the prompt does not count); < 0 encourages repeats", *BOUNDS["presence_penalty"], default=0.0),
    Field("frequency_penalty", "number", "subtracted from a token's logit once per time it was generated "
          "(OpenAI's penalty; the prompt does not count)", *BOUNDS["frequency_penalty"], default=0.0),
    Field("logit_bias", "logit_bias", f"{{token id (as a string): bias {LOGIT_BIAS}}}, at most {MAX_LOGIT_BIAS} entries, added "
          f"to those logits before sampling (greedy included); {LOGIT_BIAS.lo:g} bans a token, {LOGIT_BIAS.hi:g} "
          "forces it"),
    Field("min_p", "number", "sampling only: drop tokens less likely than min_p times the likeliest; 0 = off",
          *BOUNDS["min_p"], default=0.0),
    Field("stream", "boolean", "answer as Server-Sent Events", default=False),
    Field("response_format", "response_format", "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
          "\"json_schema\": {\"schema\": ...}}: constrained decoding, the output is JSON matching it and ends when "
          "the document is complete (unless max_tokens or a stop cuts it first: finish_reason \"length\"/\"stop\"); "
          "not with ignore_eos or min_tokens; a schema llguidance cannot enforce is a 400"),
)
PROMPT = Field("prompt", "prompt", "the text to continue, or its token ids (a one-element list of either is "
               "unwrapped)")
MODEL = Field("model", "string", "the served model's name (404 for any other)", hi=MAX_NAME_CHARS)
OPENAI = (
    MODEL,
    Field("n", "integer", "samples of the prompt, one choice each (index 0..n-1); they share the prompt's KV "
          "blocks, and sample i draws from seed + i; with logprobs it multiplies their count (see logprobs)",
          lo=1, hi=MAX_N, default=1),
    Field("stream_options", "stream_options", "{\"include_usage\": bool}: a last chunk with token counts; only "
          "with stream"),
    Field("user", "string", "an end-user id, accepted for compatibility; this server does not use it",
          hi=MAX_NAME_CHARS),
)
MESSAGES = Field("messages", "messages", f"1..{MAX_MESSAGES} turns of {{role: system|user|assistant, content: "
                 "string or text parts}}")

LOGPROBS_DOC = ("log-probabilities of the raw model distribution (float32 log_softmax of the logits, before "
                "penalties, bias or temperature)")
# Completions may ask for no tokens at all when echoing: the prompt is then only scored (lm-evaluation-harness).
ECHO_MAX_TOKENS = Field("max_tokens", "integer", MAX_TOKENS.doc + "; 0 only with echo (scores the prompt)", lo=0)
COMPLETION_EXTRAS = (
    Field("logprobs", "integer", f"the chosen token's and the N likeliest tokens' {LOGPROBS_DOC}, per token"
          + _entries_doc("/v1/completions"), *BOUNDS["logprobs"]),
    Field("echo", "boolean", "return the prompt before the completion (with logprobs: the prompt tokens' too, "
          "the first null)", default=False),
)
CHAT_EXTRAS = (
    Field("logprobs", "boolean", f"return each generated token's {LOGPROBS_DOC}" + _entries_doc("/v1/chat/completions"),
          default=False),
    Field("top_logprobs", "integer", "with logprobs: also the N likeliest tokens at each position",
          *BOUNDS["logprobs"]),
    Field("max_completion_tokens", "integer", "OpenAI's newer name for max_tokens", lo=1),
)
SCORING_MAX_TOKENS = Field("max_tokens", "integer", MAX_TOKENS.doc + "; 0 only with prompt_logprobs (scores the "
                           "prompt)", lo=0)
GENERATE_EXTRAS = (
    Field("logprobs", "integer", f"per generated token: its and the N likeliest tokens' {LOGPROBS_DOC}"
          + _entries_doc("/generate"), *BOUNDS["logprobs"]),
    Field("prompt_logprobs", "integer", "per prompt token (the first has none): its and the N likeliest "
          "tokens' logprobs", *BOUNDS["prompt_logprobs"]),
)

ROUTE_FIELDS: dict[str, tuple[Field, ...]] = {
    "/generate": (PROMPT, SCORING_MAX_TOKENS, *SAMPLING[1:], *GENERATE_EXTRAS),
    "/v1/completions": (PROMPT, *OPENAI, ECHO_MAX_TOKENS, *SAMPLING[1:], *COMPLETION_EXTRAS),
    "/v1/chat/completions": (MESSAGES, *OPENAI, *SAMPLING, *CHAT_EXTRAS),
    "/tokenize": (MODEL, Field("prompt", "string", "text to tokenize (or give messages)"),
                  Field("messages", "messages", "chat turns, rendered through the chat template (or give prompt)"),
                  Field("add_special_tokens", "boolean", "add the tokenizer's BOS/EOS around a prompt", default=True),
                  Field("add_generation_prompt", "boolean", "messages: end with the assistant turn's opening",
                        default=True)),
    "/detokenize": (MODEL, Field("tokens", "token_ids", "token ids to turn back into text")),
}

# OpenAI (and vLLM) fields this server does not implement. Each may be sent with its "off" value (what the
# official clients send by default, or null); any other value is refused rather than silently ignored.
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (1,), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "parallel_tool_calls": (), "guided_json": (), "guided_regex": (),
    "guided_choice": (), "guided_grammar": (), "structured_outputs": (), "use_beam_search": (False,),
    "length_penalty": (1,), "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,), "truncate_prompt_tokens": (), "prompt_logprobs": (),
    "service_tier": ("auto", "default"), "store": (False,), "metadata": (), "modalities": (["text"],),
    "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (), "chat_template": (),
    "chat_template_kwargs": (), "documents": (), "priority": (0,), "request_id": (),
}


@dataclass(frozen=True)
class Rule:
    """A condition between fields of one body. It is written twice, side by side: applies/holds for the check
    (check_rules), when/then as JSON Schema for the document (an OpenAPI 3.1 if/then), so the two are read
    together; tests/test_contract.py holds them to each other on generated bodies. A rule only looks at values
    of the right type: a wrong type is value()'s 422."""
    routes: tuple[str, ...]
    when: dict
    then: dict
    applies: Callable[[dict], bool]
    holds: Callable[[dict], bool]
    message: str
    status: int = 422
    code: str = "invalid_value"


def given(name: str, schema: dict) -> dict:
    """JSON Schema: the body has `name`, matching `schema`."""
    return {"required": [name], "properties": {name: schema}}


def absent(name: str) -> dict:
    """JSON Schema: the body lacks `name` or holds null there (null means "not given" for every field)."""
    return {"properties": {name: {"type": "null"}}}


NOT_NULL = {"not": {"type": "null"}}
GENERATING = ("/generate", "/v1/completions", "/v1/chat/completions")
GRAMMAR = {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["json_object", "json_schema"]}}}


def _grammar(b: dict) -> bool:
    return isinstance(rf := b.get("response_format"), dict) and rf.get("type") in ("json_object", "json_schema")


def _grammar_rule(name: str, off: bool | int) -> Rule:
    """A field the engine's grammar excludes (sampling_params.GRAMMAR_EXCLUDES, its rule and message): with a JSON
    response_format it must be null or `off`. A value of another type is value()'s 422, as for every rule."""
    kind = "boolean" if isinstance(off, bool) else "integer"
    holds = (lambda b: not isinstance(b.get(name), bool) or b.get(name) == off) if kind == "boolean" \
        else (lambda b: as_int(b.get(name)) in (None, off))
    return Rule(GENERATING, given("response_format", GRAMMAR),
                {"properties": {name: {"not": {"type": kind, "not": {"const": off}}}}},
                _grammar, holds, grammar_excludes(name), 400, "unsupported_combination")


def _zero(v: Any) -> bool:
    return as_int(v) == 0


RULES = (
    Rule(("/v1/chat/completions",), given("top_logprobs", {"type": "integer", "minimum": 1}),
         given("logprobs", {"const": True}),
         lambda b: (as_int(b.get("top_logprobs")) or 0) >= 1, lambda b: b.get("logprobs") is True,
         "'top_logprobs' needs \"logprobs\": true"),
    Rule(("/v1/chat/completions",), given("max_completion_tokens", NOT_NULL), absent("max_tokens"),
         lambda b: b.get("max_completion_tokens") is not None, lambda b: b.get("max_tokens") is None,
         "give max_tokens or max_completion_tokens (its newer name), not both"),
    Rule(("/v1/completions", "/v1/chat/completions"), given("stream_options", NOT_NULL), given("stream", {"const": True}),
         lambda b: b.get("stream_options") is not None, lambda b: b.get("stream") is True,
         "'stream_options' is only allowed with \"stream\": true", status=400),
    Rule(("/v1/completions",), given("max_tokens", {"const": 0}), given("echo", {"const": True}),
         lambda b: _zero(b.get("max_tokens")), lambda b: b.get("echo") is True,
         "'max_tokens' may be 0 only with \"echo\": true (scoring the prompt)"),
    Rule(("/generate",), given("max_tokens", {"const": 0}), given("prompt_logprobs", NOT_NULL),
         lambda b: _zero(b.get("max_tokens")), lambda b: b.get("prompt_logprobs") is not None,
         "'max_tokens' may be 0 only with 'prompt_logprobs' (scoring the prompt)"),
    *(_grammar_rule(name, off) for name, off in GRAMMAR_EXCLUDES.items()),
    Rule(("/tokenize",), given("prompt", NOT_NULL), absent("messages"),
         lambda b: b.get("prompt") is not None, lambda b: b.get("messages") is None,
         "give exactly one of 'prompt' (text) or 'messages' (chat turns), not both", code="missing_field"),
    Rule(("/tokenize",), {"not": given("prompt", NOT_NULL)}, given("messages", NOT_NULL),
         lambda b: b.get("prompt") is None, lambda b: b.get("messages") is not None,
         "give exactly one of 'prompt' (text) or 'messages' (chat turns)", code="missing_field"),
)
ROUTE_RULES = {route: tuple(r for r in RULES if route in r.routes) for route in ROUTE_FIELDS}


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


def as_int(v: Any) -> int | None:
    """v as an int if JSON Schema calls it an integer (1 and 1.0 are the same JSON number; true is not), else None.
    Floats here are finite (api/jsonbody.py refuses the rest)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v if isinstance(v, int) else None


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
