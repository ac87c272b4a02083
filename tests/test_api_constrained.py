"""response_format over HTTP on tiny-random (issue 11): every generating route constrains, streams and n > 1
too, and every malformed response_format or impossible combination is a 400 naming the field."""
import json

import httpx
import jsonschema
import pytest

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
