"""The success bodies of every route, as JSON Schema for GET /openapi.json (components/schemas). The shapes are
built in api/formats.py and api/logprobs.py; the fuzz test (tests/test_fuzz.py) validates every 200 body, and
every Server-Sent Event's data, against these, so they stay true.

A streamed answer is text/event-stream: `data: <JSON>` events, each matching the route's "x-sse-data" schema
(chunks, then the final one; an "error" object if the server shut down mid-stream), and for the OpenAI routes a
last `data: [DONE]`.
"""
from __future__ import annotations


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict, optional: dict | None = None) -> dict:
    return {"type": "object", "additionalProperties": False, "required": list(required),
            "properties": {**required, **(optional or {})}}


INT, NUM, STR = {"type": "integer"}, {"type": "number"}, {"type": "string"}
FINISH = {"enum": ["stop", "length", "abort"],
          "description": "stop: end-of-sequence, a stop token or string (or the JSON document of response_format is "
                         "complete); length: max_tokens or the context window; abort: cancelled"}
MAYBE_FINISH = {"anyOf": [FINISH, {"type": "null"}]}
GENERATE_TOKEN = obj({"token_id": INT, "token": STR, "logprob": NUM})
GENERATE_LOGPROB = {"anyOf": [{"type": "null"}, obj({"token_id": INT, "token": STR, "logprob": NUM,
                                                     "top_logprobs": {"type": "array", "items": GENERATE_TOKEN}})]}
GENERATE_LOGPROBS = {"type": "array", "items": GENERATE_LOGPROB}
CHAT_TOKEN = obj({"token": STR, "logprob": NUM, "bytes": {"type": "array", "items": INT}})
CHAT_LOGPROBS = {"anyOf": [{"type": "null"}, obj({"content": {"type": "array", "items": obj(
    {**CHAT_TOKEN["properties"], "top_logprobs": {"type": "array", "items": CHAT_TOKEN}})}})]}
COMPLETION_LOGPROBS = {"anyOf": [{"type": "null"}, obj({
    "tokens": {"type": "array", "items": STR},
    "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
    "top_logprobs": {"type": "array", "items": {"anyOf": [{"type": "null"}, {
        "type": "object", "additionalProperties": NUM}]}},
    "text_offset": {"type": "array", "items": INT}})]}


def envelope(kind: str, choice: dict, usage: str) -> dict:
    """An OpenAI object: id, object, created, model, choices; usage "required", "optional" (streams) or absent."""
    head = {"id": STR, "object": {"const": kind}, "created": INT, "model": STR,
            "choices": {"type": "array", "items": choice}}
    return obj(head | ({"usage": ref("Usage")} if usage == "required" else {}),
               {"usage": ref("Usage")} if usage == "optional" else None)


SCHEMAS = {
    "Usage": obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT}),
    "Generation": obj({"text": STR, "finish_reason": FINISH, "usage": ref("Usage"),
                       "timing_ms": obj({k: {"type": ["number", "null"]} for k in ("queue", "ttft", "total")})},
                      {"logprobs": GENERATE_LOGPROBS, "prompt_logprobs": GENERATE_LOGPROBS}),
    "GenerationChunk": obj({"text": STR}, {"logprobs": GENERATE_LOGPROBS, "prompt_logprobs": GENERATE_LOGPROBS}),
    "Completion": envelope("text_completion", obj(
        {"index": INT, "text": STR, "logprobs": COMPLETION_LOGPROBS, "finish_reason": FINISH}), "required"),
    "CompletionChunk": envelope("text_completion", obj(
        {"index": INT, "text": STR, "logprobs": COMPLETION_LOGPROBS, "finish_reason": MAYBE_FINISH}), "optional"),
    "ChatCompletion": envelope("chat.completion", obj(
        {"index": INT, "message": obj({"role": {"const": "assistant"}, "content": STR}),
         "logprobs": CHAT_LOGPROBS, "finish_reason": FINISH}), "required"),
    "ChatCompletionChunk": envelope("chat.completion.chunk", obj(
        {"index": INT, "delta": obj({}, {"role": {"const": "assistant"}, "content": STR}),
         "logprobs": CHAT_LOGPROBS, "finish_reason": MAYBE_FINISH}), "optional"),
    "Tokens": obj({"tokens": {"type": "array", "items": INT}, "count": INT, "max_model_len": INT}),
    "Text": obj({"prompt": STR}),
    "ModelList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": obj(
        {"id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR, "max_model_len": INT})}}),
    "Health": obj({"status": {"const": "ok"}}),
    "Version": obj({"version": STR}, {"commit": STR}),
    "OpenAPI": {"type": "object", "required": ["openapi", "info", "paths"]},
}


def events(*chunks: str, done: bool = True) -> dict:
    """A text/event-stream body. "schema" is one event as the SSE format parses it (OpenAPI 3.1 has no keyword
    for a stream's items; tools such as schemathesis read a stream's schema as each event's, as 3.2's itemSchema
    says): {"data": text, "event": "message"} (this server sends no event, id or retry lines). Its data is JSON
    matching one of these schemas, or the literal [DONE]; "x-sse-data" says the same of the data decoded."""
    data = {"anyOf": [ref(c) for c in chunks] + [ref("Error")]}
    as_json = {"contentMediaType": "application/json", "contentSchema": data}
    text = {"type": "string", **({"anyOf": [{"const": "[DONE]"}, as_json]} if done else as_json)}
    event = {"type": "object", "required": ["data", "event"], "additionalProperties": False,
             "properties": {"data": text, "event": {"const": "message"}}}
    return {"schema": event, "x-sse-data": {"anyOf": data["anyOf"] + ([{"const": "[DONE]"}] if done else [])}}


# route -> {media type: content entry} of its 200 answer
SUCCESS = {
    "/generate": {"application/json": {"schema": ref("Generation")},
                  "text/event-stream": events("GenerationChunk", "Generation", done=False)},
    "/v1/completions": {"application/json": {"schema": ref("Completion")},
                        "text/event-stream": events("CompletionChunk")},
    "/v1/chat/completions": {"application/json": {"schema": ref("ChatCompletion")},
                             "text/event-stream": events("ChatCompletionChunk")},
    "/tokenize": {"application/json": {"schema": ref("Tokens")}},
    "/detokenize": {"application/json": {"schema": ref("Text")}},
    "/v1/models": {"application/json": {"schema": ref("ModelList")}},
    "/health": {"application/json": {"schema": ref("Health")}},
    "/metrics": {"text/plain": {"schema": {"type": "string", "description": "Prometheus text format 0.0.4"}}},
    "/openapi.json": {"application/json": {"schema": ref("OpenAPI")}},
    "/version": {"application/json": {"schema": ref("Version")}},
}
