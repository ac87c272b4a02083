"""response_format over HTTP on tiny-random (issue 11): every generating route constrains, streams and n > 1
too, and every malformed response_format or impossible combination is a 400 naming the field."""
import asyncio
import json
import threading

import httpx
import jsonschema
import pytest

from api import response_format
from batcher import grammars
from api.errors import APIError
from model_runner.grammar import GrammarCompiler

from .server_helpers import jitney_server
from .test_api import ENV, TINY, assert_error, wait_idle
from .test_constrained import SCHEMA


@pytest.fixture(scope="module")
def client():
    with jitney_server(*TINY, env=ENV) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def as_json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_every_route_constrains(client, path):
    base = ({"messages": [{"role": "user", "content": "hi"}]} if path == "/v1/chat/completions"
            else {"prompt": "hi"})
    r = client.post(path, json={**base, "max_tokens": 80, "temperature": 0.9, "seed": 1,
                                "response_format": as_json_schema(SCHEMA)})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body if path == "/generate" else body["choices"][0]
    text = choice.get("text", choice.get("message", {}).get("content"))
    assert choice["finish_reason"] == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_stream_and_n(client):
    """json_object on a stream of n = 2 samples: each choice's pieces join into one JSON object."""
    body = {"prompt": "hi", "max_tokens": 40, "temperature": 1.0, "seed": 2, "n": 2, "stream": True,
            "response_format": {"type": "json_object"}}
    texts, reasons = {}, {}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    assert set(texts) == {0, 1}
    for i, text in texts.items():
        assert text.startswith("{")
        if reasons[i] == "stop":  # a random model may still be inside a string when max_tokens ends it
            assert isinstance(json.loads(text), dict)
    wait_idle(client)


@pytest.mark.parametrize("response_format,named", [
    ({"type": "json"}, "'response_format'"), ("json_object", "'response_format'"),
    ({"type": "json_object", "schema": {}}, "response_format.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}}, "response_format.json_schema.extra"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "response_format.json_schema.strict"),
    (as_json_schema({"type": "object", "properties": {"a": {"not": {}}}}), "response_format.json_schema.schema"),
    (as_json_schema({"type": "string", "pattern": "(unclosed"}), "response_format.json_schema.schema"),
])
def test_bad_response_formats_are_400_naming_the_field(client, response_format, named):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "response_format": response_format})
    assert named in assert_error(r, 400)["message"]


def test_combinations_that_cannot_hold_are_refused(client):
    for extra in ({"ignore_eos": True}, {"min_tokens": 2}):
        r = client.post("/generate", json={"prompt": "hi", "max_tokens": 4, **extra,
                                           "response_format": {"type": "json_object"}})
        assert next(iter(extra)) in assert_error(r, 400, "unsupported_combination")["message"]
    ok = client.post("/generate", json={"prompt": "hi", "max_tokens": 4, "response_format": {"type": "text"}})
    assert ok.status_code == 200


# --- issue 19 ---------------------------------------------------------------------------------------------------

# llguidance's "date" knows no leap years: this schema's only document, "2023-02-29", passes its grammar and fails
# the schema. The old code answered 200, finish_reason "stop", with that document.
WRONG_DATE = {"type": "string", "format": "date", "pattern": "^2023-02-29$"}


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_document_that_fails_the_schema_is_an_error_not_a_stop(client, path):
    base = ({"messages": [{"role": "user", "content": "hi"}]} if path == "/v1/chat/completions"
            else {"prompt": "hi"})
    body = {**base, "max_tokens": 40, "response_format": as_json_schema(WRONG_DATE)}
    err = assert_error(client.post(path, json=body), 500, "invalid_output")
    assert "2023-02-29" in err["message"] and "response_format" in err["message"]
    events = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200  # the stream had started: the error is its last event (before OpenAI's [DONE])
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    if path != "/generate":
        assert events.pop() == "[DONE]", events
    told = [json.loads(e) for e in events]
    assert told[-1]["error"]["code"] == "invalid_output" and sum("error" in e for e in told) == 1, told
    reasons = [e.get("finish_reason") for e in told] + [c.get("finish_reason") for e in told
                                                        for c in e.get("choices", [])]
    assert "stop" not in reasons, told
    wait_idle(client)


def test_schemas_the_engine_cannot_hold_exactly_are_400_naming_the_keyword(client):
    pathological = {"type": "object", "properties": {f"p{i}": {"type": "integer", "minimum": -123456789 * i,
                                                               "maximum": 987654321 * i + 7} for i in range(400)}}
    for schema, named in ((pathological, "too big"), ({"type": "integer", "maximum": 2**60}, "'maximum'"),
                          ({"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}, "'exclusiveMinimum'")):
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4,
                                                 "response_format": as_json_schema(schema)})
        message = assert_error(r, 400, "invalid_schema")["message"]
        assert "response_format.json_schema.schema" in message and named in message


async def test_compiles_are_bounded_and_the_excess_gets_429_after_a_bounded_wait(monkeypatch):
    """MAX_COMPILES compiles run at once (batcher/grammars.py, below the engine interface); another waits
    COMPILE_WAIT_S for a slot, then gets 429 + Retry-After. A slot is freed when its compile ends, not when its
    waiter leaves. Compiles block on an event here, so the outcome depends on no clock but the (shortened) wait."""
    monkeypatch.setattr(grammars, "COMPILE_WAIT_S", 0.2)
    release, started = threading.Event(), []

    class Blocking:  # the compiler's surface CompileSlots uses
        def cached(self, source):
            return None

        def compile(self, source):
            started.append(source)
            release.wait(10)
            return source

    class SlotEngine:  # the one EngineClient method compile_response_format uses
        slots, compiler = grammars.CompileSlots(), Blocking()

        async def compile_grammar(self, source):
            return await self.slots.compile(self.compiler, source)

    engine = SlotEngine()
    bodies = [{"response_format": as_json_schema({"type": "integer", "maximum": i})} for i in range(4)]
    running = [asyncio.create_task(response_format.compile_response_format(b, engine))
               for b in bodies[:grammars.MAX_COMPILES]]
    await asyncio.sleep(0.05)
    with pytest.raises(APIError) as refused:
        await response_format.compile_response_format(bodies[-1], engine)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    assert refused.value.code == "too_many_compiles"
    assert len(started) == grammars.MAX_COMPILES
    running[0].cancel()  # its client left: its compile still runs, and still holds its slot
    with pytest.raises(APIError):
        await response_format.compile_response_format(bodies[-1], engine)
    release.set()
    assert await running[1] == GrammarCompiler.key(bodies[1]["response_format"]["json_schema"]["schema"])
    assert await response_format.compile_response_format(bodies[-1], engine)  # a slot is free again
