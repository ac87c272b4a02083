"""OpenAI's response_format -> a compiled grammar for the sampler (model_runner/grammar.py), or None for text.

  {"type": "text"}                                    no constraint
  {"type": "json_object"}                             the output is one JSON object
  {"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}
                                                      the output is JSON matching "schema"
The shape is checked here (400 naming the field); the schema itself is compiled by llguidance in a worker
thread, so a large schema never stalls the event loop (a cache hit needs no thread), and a schema it cannot
enforce (malformed, or a keyword it does not implement, such as "not" or "uniqueItems") is a 400 with its reason.
"strict" may be given either way: the schema is always enforced.
"""
from __future__ import annotations

import asyncio

from model_runner.grammar import Grammar, GrammarCompiler, GrammarError

from .errors import APIError

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


async def compile_response_format(body: dict, compiler: GrammarCompiler | None, params) -> Grammar | None:
    """The grammar a request's response_format asks for (None for text), compiled off the event loop."""
    schema, field = requested_schema(body)
    if schema is None:
        return None
    if compiler is None:  # replicas/: a compiled grammar cannot travel to a replica (its matcher is native state)
        raise _refuse("response_format", "is not supported when serving replicas (--replicas, --ray-address): "
                                         "serve one process for constrained decoding", "unsupported_combination")
    if params.ignore_eos or params.min_tokens:
        name = "ignore_eos" if params.ignore_eos else "min_tokens"
        raise _refuse(name, "cannot be combined with response_format: the output ends (end-of-sequence) as soon "
                            "as the JSON document is complete", "unsupported_combination")
    source = compiler.key(schema)  # serialized once: its size, the cache's key, llguidance's input
    if len(source) > MAX_SCHEMA_CHARS:
        raise _refuse(field, f"is longer than {MAX_SCHEMA_CHARS} characters of JSON")
    try:
        return compiler.cached(source) or await asyncio.to_thread(compiler.compile, source)
    except GrammarError as e:
        raise _refuse(field, f"cannot be enforced: {str(e)[:500]}", "invalid_schema") from None
