"""The request fields every route accepts, declared once: name, type, bounds, what each does (Field, in one table
per route), the OpenAI/vLLM fields this server knows and refuses (UNSUPPORTED), and the conditions between fields
(RULES). The checks (api/schemas.py) and the OpenAPI document (api/openapi.py) both read these tables; the
sampling bounds come from model_runner.sampling_params.BOUNDS, which the engine checks too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from model_runner.sampling_params import BOUNDS, GRAMMAR_EXCLUDES, LOGIT_BIAS, grammar_excludes
from batcher.engine_client import MAX_N

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


def as_int(v: Any) -> int | None:
    """v as an int if JSON Schema calls it an integer (1 and 1.0 are the same JSON number; true is not), else None.
    Floats here are finite (api/jsonbody.py refuses the rest)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v if isinstance(v, int) else None
