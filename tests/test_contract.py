"""GET /openapi.json is exactly the contract the server keeps (issue 19, item 8).

An outside contract fuzzer, schemathesis, runs with every check against `jitney serve --model tiny-random`: a
request valid under the document must be accepted (2xx, or 404 for another model, 429 under load), one invalid
under it refused with a 4xx, every answer must match its documented status, media type and schema (each
Server-Sent Event too), every 405 must carry Allow (RFC 9110), and nothing may be a 5xx. The in-process
property tests below hold each piece of the document to the check it describes, on generated values: scalar
fields (types, bounds, null, 1.0 as an integer), the rules between fields, and logit_bias's key pattern.

What JSON Schema cannot say is left out of the document's schemas and stated in its text (TOKEN_LIMITS in
api/openapi.py): a text prompt's token count, and comparisons between two fields' values (prompt tokens +
max_tokens within the context window, min_tokens <= max_tokens). The hook below (schemathesis loads this module
with SCHEMATHESIS_HOOKS) drops the generated *valid* requests that break those, asking the server's own
POST /tokenize for the count; nothing else is filtered.

A longer local run, with another seed (the figure in docs/serving.md):

    JITNEY_CONTRACT_SEED=7 JITNEY_CONTRACT_EXAMPLES=60 .venv/bin/python -m pytest -q tests/test_contract.py -k fuzzer
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.openapi import field_schema, id_pattern, nullable, request_schema
from api.errors import APIError
from api.schemas import ROUTE_FIELDS, ROUTE_RULES, Model, check_rules, value

from .server_helpers import REPO, jitney_server

TINY = ("--dtype", "float32", "--kv-cache-memory", "32MiB")
ENV = {"OMP_NUM_THREADS": "1"}
EXAMPLES = int(os.environ.get("JITNEY_CONTRACT_EXAMPLES", "10"))  # per operation, in the fuzzing phase
MODEL = Model(max_model_len=1024, vocab_size=256)  # tiny-random's
DEFAULT_MAX_TOKENS = {"/generate": 128, "/v1/completions": 16, "/v1/chat/completions": None}  # None: the rest


# --- the schemathesis hook (runs inside the schemathesis process) ----------------------------------------

def prompt_tokens(client: httpx.Client, path: str, body: dict) -> int | None:
    """The prompt's token count as the route counts it, from the server's /tokenize; None if it cannot say."""
    if path == "/v1/chat/completions":
        ask = {"messages": body.get("messages")}
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list):
            return len(prompt)
        ask = {"prompt": prompt, "add_special_tokens": False}  # completions read raw text: no BOS/EOS added
    r = client.post("/tokenize", json=ask)
    return r.json()["count"] if r.status_code == 200 else None


def breaks_token_limits(client: httpx.Client, path: str, body: dict, context: int) -> bool:
    """Whether a schema-valid body breaks a limit the document states in words only (TOKEN_LIMITS)."""
    n = prompt_tokens(client, path, body)
    if n is None:
        return False
    if n >= context:
        return True
    room = context - n
    asked = body.get("max_completion_tokens")
    asked = body.get("max_tokens") if asked is None else asked
    if isinstance(asked, (int, float)) and asked > room:
        return True
    default = DEFAULT_MAX_TOKENS[path] or room
    limit = asked if isinstance(asked, (int, float)) else max(1, min(default, room))
    least = body.get("min_tokens")
    return isinstance(least, (int, float)) and least > limit


if url := os.environ.get("JITNEY_CONTRACT_URL"):
    import schemathesis

    _client = httpx.Client(base_url=url, timeout=60)
    _context = _client.get("/v1/models").json()["data"][0]["max_model_len"]

    @schemathesis.hook
    def filter_case(context, case) -> bool:
        meta = case.meta
        if (meta is None or not meta.generation.mode.is_positive or case.operation.path not in DEFAULT_MAX_TOKENS
                or not isinstance(case.body, dict)):
            return True
        return not breaks_token_limits(_client, case.operation.path, case.body, _context)


# --- the outside fuzzer ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with jitney_server(*TINY, env=ENV) as s:
        yield s


def test_contract_fuzzer_with_every_check_finds_nothing(server, tmp_path):
    """schemathesis 4.32.5, all checks, derandomized: 0 failures (before: 13 in 39 cases)."""
    exe = Path(sys.executable).with_name("schemathesis")
    env = {**os.environ, "JITNEY_CONTRACT_URL": server.url, "SCHEMATHESIS_HOOKS": "tests.test_contract",
           "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    # cwd: schemathesis keeps replay data in ./.schemathesis; not in the repository.
    # make test: derandomized, so CI cannot flake; JITNEY_CONTRACT_SEED=N draws a different run instead.
    seeding = ["--seed", os.environ["JITNEY_CONTRACT_SEED"], "--generation-database", "none"] \
        if "JITNEY_CONTRACT_SEED" in os.environ else ["--generation-deterministic"]
    run = subprocess.run([str(exe), "run", f"{server.url}/openapi.json", "--checks", "all", "--max-examples",
                          str(EXAMPLES), *seeding, "--no-shrink"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert "Traceback" not in server.output()


ROUTES = {"/generate": {"POST"}, "/v1/completions": {"POST"}, "/v1/chat/completions": {"POST"},
          "/tokenize": {"POST"}, "/detokenize": {"POST"}, "/v1/models": {"GET", "HEAD"},
          "/openapi.json": {"GET", "HEAD"}, "/health": {"GET", "HEAD"}, "/metrics": {"GET", "HEAD"},
          "/version": {"GET", "HEAD"}}


def test_every_405_says_which_methods_the_route_takes(server):
    """RFC 9110 15.5.6: a 405 carries Allow, listing exactly the route's methods (every route, every method)."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for path, methods in ROUTES.items():
            for method in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"} - methods:
                r = client.request(method, path)
                assert r.status_code == 405, (method, path, r.status_code)
                assert set(r.headers["allow"].split(", ")) == methods, (method, path, r.headers)


# --- each piece of the document against the check it describes -------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 1030)
    | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, 1.0, 2.0, 16.0, -1.0, 0.5, 1e300])
    | st.text(max_size=8) | st.sampled_from(["", "a" * 300]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=4)
SCALARS = [(route, f) for route, fields in ROUTE_FIELDS.items() for f in fields
           if f.kind in ("integer", "number", "boolean", "string")]


def model_bound(route: str, name: str) -> float | None:
    """The bound the routes pass to value() for fields whose limit is the model's (schemas.sampling_params)."""
    return MODEL.max_model_len - 1 if name in ("max_tokens", "max_completion_tokens", "min_tokens") else None


SCALAR_SCHEMAS = [(route, f, jsonschema.Draft202012Validator(nullable(field_schema(f, MODEL)))) for route, f in SCALARS]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(v=json_values)
def test_a_scalar_field_takes_exactly_what_its_schema_says(v):
    """The document's schema for each scalar field of every route accepts a value iff value() does: types (1.0 is
    an integer, as JSON Schema reads it; true is not), bounds (open or closed), lengths, and null (= default)."""
    for route, f, schema in SCALAR_SCHEMAS:
        documented = schema.is_valid(v)
        try:
            value({f.name: v}, f, hi=model_bound(route, f.name))
            accepted = True
        except APIError as e:
            assert e.status == 422, e.message
            accepted = False
        assert documented == accepted, (route, f.name, v, schema.schema)


RULE_FIELDS = {"top_logprobs", "logprobs", "max_tokens", "max_completion_tokens", "stream_options", "stream",
               "echo", "prompt_logprobs", "response_format", "ignore_eos", "min_tokens", "prompt", "messages"}
rule_values = st.one_of(json_values, st.sampled_from([
    0, 1, 1.0, 0.0, 3, True, False, None, {}, {"include_usage": True}, [{"role": "user", "content": "x"}], "x",
    {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {}}}, {"type": 1}]))


RULE_SCHEMAS = {route: jsonschema.Draft202012Validator({"allOf": request_schema(route, MODEL)["allOf"]})
                for route in ROUTE_FIELDS if ROUTE_RULES[route]}


@settings(max_examples=500, deadline=None, derandomize=True)
@given(body=st.dictionaries(st.sampled_from(sorted(RULE_FIELDS)), rule_values, max_size=5))
def test_the_rules_between_fields_are_what_the_document_says(body):
    """On every route, check_rules refuses a body iff the document's if/then rules (the allOf) do."""
    for route, rules in RULE_SCHEMAS.items():
        documented = rules.is_valid(body)
        try:
            check_rules(body, route)
            accepted = True
        except APIError as e:
            assert e.status in (400, 422)
            accepted = False
        assert documented == accepted, (route, body)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(key=st.text(alphabet="0123456789", min_size=1, max_size=12) | st.text(max_size=12),
       vocab=st.sampled_from([1, 2, 10, 11, 99, 100, 101, 256, 1000, 32000, 49152, 128256, 10**10]))
def test_logit_bias_keys_match_the_documented_pattern(key, vocab):
    """logit_bias's key pattern (propertyNames) is exactly the check: decimal token ids below the vocabulary,
    leading zeros allowed, at most 10 characters."""
    from api.schemas import logit_bias
    documented = jsonschema.Draft202012Validator({"pattern": id_pattern(vocab)}).is_valid(key)
    try:
        logit_bias({"logit_bias": {key: 0}}, vocab)
        accepted = True
    except APIError:
        accepted = False
    assert documented == accepted, (key, vocab, id_pattern(vocab))


def test_the_document_states_what_json_schema_cannot():
    """The token limits are said in the request's description, on every generating route, and nowhere is a
    schema left open where the check is closed: every optional field says null, unknown fields only null."""
    for route in ROUTE_FIELDS:
        schema = request_schema(route, MODEL)
        assert schema["additionalProperties"] == {"type": "null"}
        if route in DEFAULT_MAX_TOKENS:
            assert "prompt tokens + max_tokens" in schema["description"]
            assert math.isclose(schema["properties"]["max_tokens"]["maximum"], MODEL.max_model_len - 1)
