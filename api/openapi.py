"""GET /openapi.json: the API's contract, built from the very field tables the checks read (api/fields.py),
so a bound changed there changes here. The fuzz test (tests/test_fuzz.py) generates requests from this
document and holds the server to it: no 5xx, every error the JSON shape below, every success body (and every
streamed event) the shape api/responses.py publishes.
"""
from __future__ import annotations

import json

from model_runner.sampling_params import LOGIT_BIAS

from .response_format import MAX_NAME_CHARS, MAX_SCHEMA_CHARS
from .responses import SCHEMAS, SUCCESS
from .fields import (GENERATING, MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_PARTS, MAX_STOP, MAX_STOP_CHARS, ROUTE_FIELDS,
                     ROUTE_RULES, UNSUPPORTED, Field)
from .schemas import Model

ERROR = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"], "additionalProperties": False,
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": ["string", "null"]}}}}}
ERRORS = {
    "400": "not JSON, nested too deeply, a number out of range, a duplicate key; a field this server does not "
           "support; max_tokens beyond what the context leaves after the prompt; an unusable prompt",
    "401": "a missing or wrong API key (when the server has keys)",
    "404": "an unknown route, or a model this server does not serve",
    "408": "the body did not arrive within --body-timeout-s",
    "413": "a body over --max-body-bytes",
    "415": "a body without 'Content-Type: application/json'",
    "422": "a missing field, a wrong type, or a value out of its bounds",
    "429": "over the queue bound, or no response_format compile slot within 2 s (Retry-After says when to retry)",
    "500": "invalid_output: a response_format output that could not end as a document matching the schema",
    "503": "the server is shutting down",
    "504": "the request waited longer than --timeout-s to start",
}
REQUIRED = {"/generate": ["prompt"], "/v1/completions": ["prompt"], "/v1/chat/completions": ["messages"],
            "/detokenize": ["tokens"]}


def id_pattern(vocab_size: int) -> str:
    """A regex for the decimal strings logit_bias takes as keys: a token id below vocab_size, at most 10 digits,
    leading zeros allowed (what schemas.logit_bias reads with int())."""
    top = str(vocab_size - 1)
    alternatives = []
    for width in range(1, len(top) + 1):  # canonical numbers of this many digits, then zeros in front
        if width < len(top):
            canonical = ["[0-9]" if width == 1 else f"[1-9][0-9]{{{width - 1}}}"]
        else:  # up to top: a shared prefix, one smaller digit, then anything
            canonical = [top]
            for i, digit in enumerate(top):
                lo = 1 if i == 0 and width > 1 else 0
                if int(digit) > lo:
                    rest = f"[0-9]{{{width - i - 1}}}" if width - i - 1 else ""
                    canonical.append(f"{top[:i]}[{lo}-{int(digit) - 1}]{rest}")
        alternatives += [f"0{{0,{10 - width}}}{c}" for c in canonical]
    return f"^({'|'.join(alternatives)})$"


def nullable(schema: dict) -> dict:
    """null in any optional field means its default (schemas.value)."""
    if "type" in schema:
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [{k: v for k, v in schema.items() if k != "description"}, {"type": "null"}],
            "description": schema["description"]}


def field_schema(f: Field, model: Model) -> dict:
    ids = {"type": "integer", "minimum": 0, "maximum": model.vocab_size - 1}
    prompt_ids = {"type": "array", "items": ids, "minItems": 1, "maxItems": model.max_model_len - 1}
    prompt_text = {"type": "string", "minLength": 1}  # its tokens must fit the window too: see request_schema
    text = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    shapes = {
        # An empty prompt is refused (as vLLM does): there is nothing to continue from.
        "prompt": {"oneOf": [prompt_text, prompt_ids, {"type": "array", "minItems": 1, "maxItems": 1,
                                                       "items": {"oneOf": [prompt_text, prompt_ids]}}]},
        "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": {
            "type": "object", "required": ["role", "content"], "additionalProperties": {"type": "null"},
            "properties": {
                "role": {"enum": ["system", "user", "assistant"]},
                "content": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": MAX_PARTS, "items": {
                    "type": "object", "required": ["type", "text"], "additionalProperties": False,
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}},
        "stop": {"oneOf": [text, {"type": "array", "maxItems": MAX_STOP, "items": text}]},
        "token_ids": {"type": "array", "items": ids,
                      "maxItems": model.max_model_len if f.name == "tokens" else MAX_STOP},
        "logit_bias": {"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                       "propertyNames": {"pattern": id_pattern(model.vocab_size)},
                       "additionalProperties": {"type": "number", "minimum": LOGIT_BIAS.lo,
                                                "maximum": LOGIT_BIAS.hi}},
        "stream_options": {"type": "object", "additionalProperties": False,
                           "properties": {"include_usage": {"type": "boolean"}}},
        "response_format": {"oneOf": [
            {"type": "object", "required": ["type"], "additionalProperties": False,
             "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False, "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {"type": "object", "required": ["schema"], "additionalProperties": False, "properties": {
                    "name": {"type": ["string", "null"], "maxLength": MAX_NAME_CHARS},
                    "description": {"type": ["string", "null"]},
                    "strict": {"type": ["boolean", "null"],
                               "description": "accepted either way: the schema is always enforced"},
                    "schema": {"type": "object", "description": "a JSON Schema (what llguidance implements of draft "
                               f"2020-12; at most {MAX_SCHEMA_CHARS} characters of JSON once its annotations (title, "
                               "description, examples, $comment) are left out, nested at most 32 deep in the body); "
                               "an unimplemented keyword (not, uniqueItems, ...) is a 400"}}}}}]},
    }
    if f.kind in shapes:
        schema = shapes[f.kind]
    else:
        schema = {"type": f.kind}
        # A prompt holds at least one token, so at most max_model_len - 1 are left to generate.
        hi = model.max_model_len - 1 if f.name in ("max_tokens", "max_completion_tokens", "min_tokens") else f.hi
        if f.kind == "string":
            schema |= {"maxLength": int(hi)} if hi is not None else {}
        else:
            if f.lo is not None:
                schema["exclusiveMinimum" if f.open_lo else "minimum"] = f.lo
            if hi is not None:
                schema["maximum"] = hi
        if f.default is not None:
            schema["default"] = f.default
    return {**schema, "description": f.doc}


TOKEN_LIMITS = ("Limits JSON Schema cannot state, as they count the prompt's tokens (POST /tokenize counts them) "
                "or compare two fields: the prompt must hold fewer tokens than the context window; with "
                "max_tokens, prompt tokens + max_tokens must fit it (400 context_length_exceeded; a default "
                "max_tokens is lowered to fit instead); min_tokens must not exceed max_tokens (given or default) "
                "(422).")


def request_schema(route: str, model: Model) -> dict:
    accepted = ROUTE_FIELDS[route]
    required = REQUIRED.get(route, [])
    properties = {f.name: field_schema(f, model) if f.name in required else nullable(field_schema(f, model))
                  for f in accepted}
    names = {f.name for f in accepted}
    for name, off in UNSUPPORTED.items():  # known but not implemented: only its "off" value
        if name not in names:
            properties[name] = {"enum": [*off, None], "description": "not implemented: accepted only as "
                                f"{' or '.join(json.dumps(v) for v in off) or 'null'}"}
    schema = {"type": "object", "additionalProperties": {"type": "null"}, "required": required,
              "properties": properties,
              "description": "Any other field is refused with 400 'not supported', unless it is null. null in any "
                             "field means its default." + (f" {TOKEN_LIMITS}" if route in GENERATING else "")}
    if rules := ROUTE_RULES[route]:
        schema["allOf"] = [{"if": r.when, "then": r.then, "description": r.message} for r in rules]
    return schema


def operation(summary: str, model: Model, path: str, route: str | None = None) -> dict:
    """route: the field table of the request body, if the operation takes one."""
    op = {"summary": summary, "responses": {
        "200": {"description": "success", "content": SUCCESS[path]},
        **{code: {"description": why, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
           for code, why in ERRORS.items()}}}
    if route is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": request_schema(route, model)}}}
    return op


def openapi_document(model_name: str, model: Model) -> dict:
    posts = {"/generate": "jitney's own generation route (Server-Sent Events with stream)",
             "/v1/completions": "OpenAI completions",
             "/v1/chat/completions": "OpenAI chat completions, through the model's chat template",
             "/tokenize": "text or chat turns -> {tokens, count, max_model_len} (vLLM's shape)",
             "/detokenize": "token ids -> {prompt} (vLLM's shape)"}
    gets = {"/v1/models": "the served model",
            "/health": "200 when the model is loaded and the engine loop alive, else 503",
            "/metrics": "Prometheus metrics", "/openapi.json": "this document",
            "/version": "the server's package version, and its git commit when run from a checkout (behind the API "
                        "key, like every route but /health)"}
    paths = {**{p: {"post": operation(why, model, p, p)} for p, why in posts.items()},
             **{p: {"get": operation(why, model, p)} for p, why in gets.items()}}
    return {"openapi": "3.1.0",
            "info": {"title": "jitney", "version": "0.1.0",
                     "description": f"Serving {model_name} (context window {model.max_model_len} tokens). Every error "
                                    "is JSON {\"error\": {\"message\", \"type\", \"code\"}}."},
            "paths": paths, "components": {"schemas": {"Error": ERROR, **SCHEMAS}}}
