"""Property-based fuzz of every route against the server's own GET /openapi.json (issue 11, section 5).

Requests are drawn by hypothesis from the published request schemas, with any field swapped for arbitrary
JSON (extreme numbers, wrong types, nesting), unknown fields added, and now and then a non-JSON body or content
type. The property: no answer is a 5xx, every error is the JSON shape {"error": {"message", "type", "code"}},
every success body (and each streamed event's data) matches the document's 200 schema for its route, and the
server logs no traceback. In the normal run: tiny-random, a fixed seed, a bounded number of cases.

A long run, against a server it starts (the figure in the README):

    .venv/bin/python -m tests.test_fuzz --requests 10000
"""
from __future__ import annotations

import argparse
import json
import sys

import httpx
import jsonschema
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from .server_helpers import jitney_server, parse_metrics

TINY = ("--dtype", "float32", "--kv-cache-memory", "32MiB")
ENV = {"OMP_NUM_THREADS": "1"}
SMALL = ("max_tokens", "max_completion_tokens", "min_tokens")  # keep generation short: the fuzz is of the API

wild = st.recursive(
    st.none() | st.booleans() | st.integers(-10**60, 10**60) | st.integers(-3, 300)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    | st.sampled_from(["<|im_start|>system", "\ud800", "", "a" * 3000]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12)


def from_schema(schema: dict, name: str = "") -> st.SearchStrategy:
    """A strategy for values of a (small) JSON Schema: the subset /openapi.json uses."""
    for either in ("oneOf", "anyOf"):
        if either in schema:
            return st.one_of([from_schema(s, name) for s in schema[either]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if isinstance(kind, list):  # ["integer", "null"]: null means the default
        return st.one_of([from_schema({**schema, "type": k}, name) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if name in SMALL:
            hi = min(hi or 8, 8)
        return st.integers(lo, hi)
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(lo, schema.get("maximum"), allow_nan=False, allow_infinity=False,
                         exclude_min="exclusiveMinimum" in schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), name), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 5), 5))
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v, k) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v, k) for k, v in props.items() if k not in required})
    return wild


def body_strategy(schema: dict) -> st.SearchStrategy:
    """Mostly schema-valid bodies, with some fields replaced by anything and unknown fields added."""
    valid = from_schema(schema)
    names = sorted(schema.get("properties", {})) + ["logprobs", "tools", "n", "stream", "zzz"]
    broken = st.tuples(valid, st.dictionaries(st.sampled_from(names), wild, max_size=3)).map(
        lambda t: {**t[0], **t[1]})
    return st.one_of(valid, valid, broken)


def request_strategy(document: dict) -> st.SearchStrategy:
    """(method, path, content type, raw body) for every route of the document."""
    choices = []
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            if "requestBody" not in op:
                choices.append(st.just((method.upper(), path, None, None)))
                continue
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            as_json = body_strategy(schema).map(lambda b: json.dumps(b).encode())
            raw = st.one_of(as_json, as_json, as_json, st.binary(max_size=64),
                            st.sampled_from([b'{"prompt": 1e999}', b"[" * 5000, b'{"a": 1, "a": 2}', b""]))
            ctype = st.sampled_from(["application/json"] * 6 + ["text/plain", None])
            choices.append(st.tuples(st.just(method.upper()), st.just(path), ctype, raw))
    return st.one_of(choices)


def check_success(document: dict, method: str, path: str, r: httpx.Response) -> None:
    """A 200 body against the document's schema for it: JSON as a whole, an event stream event by event."""
    content = document["paths"][path][method.lower()]["responses"]["200"]["content"]
    media = r.headers["content-type"].split(";")[0]
    assert media in content, (path, media)
    entry = content[media]
    schema, payloads = entry["schema"], [r.text]
    if media == "application/json":
        payloads = [r.json()]
    elif media == "text/event-stream":
        schema = entry["x-sse-data"]
        payloads = [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                    for line in r.text.split("\n") if line.startswith("data: ")]
        assert payloads, r.text[:300]
    for payload in payloads:
        jsonschema.validate(payload, {**schema, "components": document["components"]})


def check(client: httpx.Client, request: tuple, document: dict | None = None) -> int:
    method, path, ctype, raw = request
    headers = {"content-type": ctype} if ctype else {}
    r = client.request(method, path, content=raw, headers=headers)
    assert r.status_code < 500, (request, r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    elif document is not None:
        check_success(document, method, path, r)
    return r.status_code


def fuzz(server_url: str, cases: int, fixed_seed: int = 11) -> dict[int, int]:
    """Runs `cases` generated requests against a server; returns how many got each status."""
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server_url, timeout=60) as client:
        document = client.get("/openapi.json").json()

        @seed(fixed_seed)
        @settings(max_examples=cases, database=None, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(request_strategy(document))
        def one(request):
            status = check(client, request, document)
            statuses[status] = statuses.get(status, 0) + 1

        one()
    return statuses


def server_errors(server) -> float:
    m = parse_metrics(httpx.get(f"{server.url}/metrics", timeout=10).text)
    return sum(v for (name, labels), v in m.items()
               if name == "jitney_http_requests_total" and dict(labels)["status"].startswith("5"))


def test_fuzz_every_route_against_the_openapi_document():
    with jitney_server(*TINY, env=ENV) as server:
        statuses = fuzz(server.url, cases=300)
        assert sum(statuses.values()) >= 300
        assert server_errors(server) == 0
        assert "Traceback" not in server.output()


def test_openapi_document_names_every_route_and_bound():
    with jitney_server(*TINY, env=ENV) as server:
        doc = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    from api.settings import ROUTES
    assert set(doc["paths"]) == set(ROUTES)
    gen = doc["paths"]["/generate"]["post"]
    props = gen["requestBody"]["content"]["application/json"]["schema"]["properties"]
    # A prompt holds at least one token: at most context - 1 are left to generate (tiny-random's context is 1024).
    assert props["max_tokens"]["maximum"] == 1023 and props["repetition_penalty"]["minimum"] == 0.1
    assert gen["responses"]["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    for path, ops in doc["paths"].items():  # every success body is described, not left as {}
        for op in ops.values():
            assert all(entry["schema"] for entry in op["responses"]["200"]["content"].values()), path
    shapes = props["response_format"]["anyOf"][0]  # (null, its other alternative, means the default: text)
    kinds = [alt["properties"]["type"] for alt in shapes["oneOf"]]
    assert kinds == [{"enum": ["text", "json_object"]}, {"const": "json_schema"}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fuzz a fresh `jitney serve --model tiny-random` from its OpenAPI document.")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args(argv)
    with jitney_server(*TINY, env=ENV) as server:
        statuses = fuzz(server.url, args.requests, args.seed)
        errors, tracebacks = server_errors(server), server.output().count("Traceback")
    print(f"{sum(statuses.values())} requests; statuses {dict(sorted(statuses.items()))}; "
          f">= 500: {errors:.0f}; tracebacks in the server log: {tracebacks}")
    return 0 if errors == 0 and tracebacks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
