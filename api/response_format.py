"""OpenAI's response_format -> a compiled grammar for the sampler (model_runner/grammar.py), or None for text.

  {"type": "text"}                                    no constraint
  {"type": "json_object"}                             the output is one JSON object
  {"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}
                                                      the output is JSON matching "schema"
The shape is checked here (400 naming the field). A large schema's cache key (its JSON text, annotations left out)
is made on the prep thread (api/offload.py), in work bounded by MAX_SCHEMA_CHARS, not by the schema; the schema
itself is compiled by llguidance in a worker thread, so a large schema never stalls the event loop (a cache hit
needs no thread). The engine compiles it (batcher/grammars.py; over replicas, the replica that runs the request),
and a schema it cannot enforce (malformed, a keyword it does not implement such as "not" or "uniqueItems", a bound
it would enforce inexactly, or more lexer work than its compile limit: model_runner/grammar.py) is a 400 with its
reason. Too many compiles at once (batcher/grammars.py MAX_COMPILES) is a 429.
"strict" may be given either way: the schema is always enforced.
"""
from __future__ import annotations

import json

from batcher.grammars import TooManyCompiles
from model_runner.grammar import GrammarError, _without_annotations

from .errors import APIError
from .offload import OFFLOAD_BYTES, PrepThread

MAX_SCHEMA_CHARS = 32 * 1024  # a schema's JSON text; keeps compile time in milliseconds
MAX_NAME_CHARS = 64           # OpenAI's bound on json_schema.name
JSON_OBJECT = {"type": "object"}
SHAPE = ('{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": ..., '
         '"schema": {...}}}')


def _refuse(field: str, why: str, code: str = "invalid_response_format") -> APIError:
    return APIError(400, f"'{field}' {why}", code=code)


def requested_schema(body: dict) -> tuple[dict | None, str]:
    """(the JSON schema the output must match, or None; the field that holds it, for error messages)."""
    rf = body.get("response_format")
    if rf is None:
        return None, ""
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _refuse("response_format", f"must be {SHAPE}")
    if extra := sorted(set(rf) - {"type"} - ({"json_schema"} if kind == "json_schema" else set())):
        raise _refuse(f"response_format.{extra[0][:60]}", f"is not a field of a {kind!r} response_format ({SHAPE})")
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return JSON_OBJECT, "response_format"
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise _refuse("response_format.json_schema", "must be an object {\"name\", \"schema\", \"description\", "
                                                     "\"strict\"}")
    if extra := sorted(set(spec) - {"name", "description", "schema", "strict"}):
        raise _refuse(f"response_format.json_schema.{extra[0][:60]}", "is not supported (accepted: name, "
                                                                        "description, schema, strict)")
    name, description, strict = spec.get("name"), spec.get("description"), spec.get("strict")
    if name is not None and not (isinstance(name, str) and len(name) <= MAX_NAME_CHARS):
        raise _refuse("response_format.json_schema.name", f"must be a string of at most {MAX_NAME_CHARS} characters")
    if description is not None and not isinstance(description, str):
        raise _refuse("response_format.json_schema.description", "must be a string")
    if strict is not None and not isinstance(strict, bool):
        raise _refuse("response_format.json_schema.strict", "must be a boolean")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _refuse("response_format.json_schema.schema", "is required: a JSON Schema object")
    return schema, "response_format.json_schema.schema"


def schema_source(schema: dict, limit: int = MAX_SCHEMA_CHARS) -> str | None:
    """GrammarCompiler.key(schema), the cache's key and llguidance's input, or None when it is longer than limit
    characters. Leaving the annotations out walks the whole schema in Python (the GIL changes hands meanwhile); the
    text is then written by canonical_json, whose work stops at the limit: json.dumps of a megabyte schema is one C
    call that holds the GIL for over 100 ms, whichever thread makes it."""
    return canonical_json(_without_annotations(schema), limit)


def canonical_json(value, limit: int) -> str | None:
    """json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) (value parsed from JSON), or
    None as soon as that text is known to be longer than limit characters: a container or string whose shortest
    JSON text would pass what is left is not walked at all, so the work grows with the limit, not with value."""
    out: list[str] = []
    return "".join(out) if _write(value, out, limit) >= 0 else None


def _write(v, out: list[str], left: int) -> int:
    """Appends v's JSON text to out; returns the characters left of the budget (negative: over it, stopped)."""
    if isinstance(v, dict):
        if 5 * len(v) + 1 > left:  # n entries are at least '"":0' each, n - 1 commas and the braces
            return -1
        out.append("{")
        left -= 2
        for i, k in enumerate(sorted(v)):
            key = ("," if i else "") + json.dumps(k, ensure_ascii=False) + ":"
            out.append(key)
            if (left := _write(v[k], out, left - len(key))) < 0:
                return -1
        out.append("}")
        return left
    if isinstance(v, list):
        if 2 * len(v) + 1 > left:  # n items are at least one character each, with n - 1 commas and the brackets
            return -1
        out.append("[")
        left -= 2
        for i, item in enumerate(v):
            if i:
                out.append(",")
                left -= 1
            if (left := _write(item, out, left)) < 0:
                return -1
        out.append("]")
        return left
    if isinstance(v, str) and len(v) + 2 > left:
        return -1
    text = json.dumps(v, ensure_ascii=False)
    out.append(text)
    return left - len(text)


def _small(value, budget: int = OFFLOAD_BYTES) -> bool:
    """Whether value has at most about budget characters of JSON (a node counts one, a string or container its
    length too): the cheap test, at most budget steps and no container over budget copied, that keeps a small
    schema on the event loop (a thread hop costs more)."""
    stack = [value]
    while stack:
        v = stack.pop()
        budget -= 1 + (len(v) if isinstance(v, (str, dict, list)) else 0)  # (a container's items count again)
        if budget < 0:
            return False
        if isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, list):
            stack += v
    return True


def schema_refused(field: str, e: GrammarError) -> APIError:
    return _refuse(field, f"cannot be enforced: {str(e)[:500]}", "invalid_schema")


async def compile_response_format(body: dict, engine, prep: PrepThread | None = None):
    """What SamplingParams.grammar carries for a request's response_format (None for text): the engine's
    compile_grammar() of the schema's text (batcher/engine_client.py). A large schema's text is made on prep (None:
    here). ignore_eos and min_tokens, which a grammar excludes, were refused with the body's other rules
    (api/fields.py RULES) before this runs."""
    schema, field = requested_schema(body)
    if schema is None:
        return None
    # Serialized once: its size, the cache's key, llguidance's input (or what travels to a replica).
    source = await prep.run(schema_source, schema) if prep is not None and not _small(schema) \
        else schema_source(schema)
    if source is None:
        raise _refuse(field, f"is longer than {MAX_SCHEMA_CHARS} characters of JSON (annotations left out)")
    try:
        return await engine.compile_grammar(source)
    except GrammarError as e:
        raise schema_refused(field, e) from None
    except TooManyCompiles as e:
        raise APIError(429, str(e), "overloaded", "too_many_compiles", {"Retry-After": "1"}) from None
