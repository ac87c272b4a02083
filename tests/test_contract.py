"""GET /openapi.json is exactly the contract the server keeps (issue 19, item 8).

An outside contract fuzzer, schemathesis, runs with every check against `jitney serve --model tiny-random`: a
request valid under the document must be accepted (2xx, or 404 for another model, 429 under load), one invalid
under it refused with a 4xx, every answer must match its documented status, media type and schema (each
Server-Sent Event too), every 405 must carry Allow (RFC 9110), and nothing may be a 5xx. The in-process
property tests below hold each piece of the document to the check it describes, on generated values: scalar
fields (types, bounds, null, 1.0 as an integer), the rules between fields, and logit_bias's key pattern.

What JSON Schema cannot say is left out of the document's schemas and stated in its text (TOKEN_LIMITS in
api/openapi.py, the field descriptions): a text prompt's token count, comparisons between two fields' values
(prompt tokens + max_tokens within the context window, min_tokens <= max_tokens), and the bound on an answer's
logprob entries, a product of several fields and the prompt's tokens (fields.MAX_LOGPROB_ENTRIES). The hook
(filter_case, registered for the fuzzer's run) drops the generated *valid* requests that break those, asking the server's own POST /tokenize for the count and the server's own sampling_params for the
logprob bound; nothing else is filtered.

The server's context is cut to CONTEXT tokens: the coverage phase asks for max_tokens at its maximum, and each
such answer is generated; at 512 the bound on logprob entries can still be reached (16 x 511 x 21 > 131,072),
so the hook's filter for it is exercised. The phases are coverage (every field's boundary and wrong values, the
bulk of the cases) and fuzzing (EXAMPLES random requests per operation); examples and stateful find nothing to
run here (no examples in the document, no links), so they are named out rather than left to skip. Two workers:
the client's own work (generating and validating) is half the run. A longer local run, with another seed (the
figure in docs/serving.md):

    JITNEY_CONTRACT_SEED=7 JITNEY_CONTRACT_EXAMPLES=60 .venv/bin/python -m pytest -q tests/test_contract.py -k fuzzer
"""
from __future__ import annotations

import ast
import json
import math
import os
import sys
import threading

import httpx
import hypothesis
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.openapi import field_schema, id_pattern, nullable, request_schema
from api.errors import APIError
from api.fields import GENERATING, ROUTE_FIELDS, ROUTE_RULES
from api.schemas import Model, check_rules, sampling_params, spec, value
from model_runner.errors import InvalidSamplingParams
from model_runner.sampling_params import SamplingParams

from .server_helpers import jitney_server

TINY = ("--dtype", "float32", "--kv-cache-memory", "32MiB")
ENV = {"OMP_NUM_THREADS": "1"}
EXAMPLES = int(os.environ.get("JITNEY_CONTRACT_EXAMPLES", "10"))  # per operation, in the fuzzing phase
CONTEXT = 512  # the fuzzed server's --max-model-len
MODEL = Model(max_model_len=1024, vocab_size=256)  # tiny-random's
DEFAULT_MAX_TOKENS = {"/generate": 128, "/v1/completions": 16, "/v1/chat/completions": None}  # None: the rest


# --- the schemathesis hook: limits the document states in words ------------------------------------------

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


def breaks_stated_limits(client: httpx.Client, path: str, body: dict, context: int) -> bool:
    """Whether a schema-valid body breaks a limit the document states in words only."""
    n = prompt_tokens(client, path, body)
    return n is not None and (breaks_token_limits(path, body, n, context)
                              or breaks_logprob_bound(path, body, n, context))


def breaks_token_limits(path: str, body: dict, n: int, context: int) -> bool:
    """TOKEN_LIMITS, for a prompt of n tokens."""
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


def breaks_logprob_bound(path: str, body: dict, n: int, context: int) -> bool:
    """Whether the server refuses the body (422 too_many_logprobs) for its logprob entries, by the server's own
    count (schemas.sampling_params, which lowers a default max_tokens to fit first), as the route calls it."""
    body = dict(body)
    if path == "/v1/chat/completions" and body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body["max_completion_tokens"]  # api/routes.py's chat_request, before sampling_params
    samples = 1 if path == "/generate" else value(body, spec(path, "n"))
    try:
        sampling_params(body, path, Model(context, MODEL.vocab_size), n, DEFAULT_MAX_TOKENS[path] or context, samples)
    except APIError as e:
        return e.code == "too_many_logprobs"
    return False


def keeps(client: httpx.Client, case) -> bool:
    """schemathesis's filter_case hook: False for a generated valid request that breaks a stated limit."""
    meta = case.meta
    if (meta is None or not meta.generation.mode.is_positive or case.operation.path not in DEFAULT_MAX_TOKENS
            or not isinstance(case.body, dict)):
        return True
    return not breaks_stated_limits(client, case.operation.path, case.body, CONTEXT)


# --- the outside fuzzer ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with jitney_server(*TINY, "--max-model-len", str(CONTEXT), env=ENV) as s:
        yield s


def test_contract_fuzzer_with_every_check_finds_nothing(server, tmp_path, monkeypatch):
    """schemathesis 4.32.5, all checks, derandomized: 0 failures (before: 13 in 39 cases).

    Its command line runs in this process (click's CliRunner), which has imported the server's modules the hook
    reads already: a `schemathesis run` process spent 10-15 s importing them (torch among them) before its first
    request. The hook is registered for the run only."""
    from click.testing import CliRunner
    from schemathesis.cli import schemathesis as cli

    # make test: derandomized, so CI cannot flake; JITNEY_CONTRACT_SEED=N draws a different run instead.
    seeding = ["--seed", os.environ["JITNEY_CONTRACT_SEED"], "--generation-database", "none"] \
        if "JITNEY_CONTRACT_SEED" in os.environ else ["--generation-deterministic"]
    monkeypatch.chdir(tmp_path)  # schemathesis keeps replay data in ./.schemathesis; not in the repository
    monkeypatch.setenv("NO_COLOR", "1")
    # pytest rewrites the asserts of every module of a plugin's package (hypothesis, schemathesis) as it is first
    # imported, with ast.parse; two workers importing one at once broke CPython 3.11.7's ast.parse ("SystemError:
    # AST constructor recursion depth mismatch", seen in this test). Not for this run, then.
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "AssertionRewritingHook"])
    # The same CPython 3.11.7 bug also reached hypothesis's own ast.parse (it describes
    # a lambda strategy from its source) in both workers at once: one parse at a time for this run.
    parse, parsing = ast.parse, threading.Lock()

    def one_parse_at_a_time(*args, **kwargs):
        with parsing:
            return parse(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", one_parse_at_a_time)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        def filter_case(context, case) -> bool:
            return keeps(client, case)

        schemathesis.hook(filter_case)
        # --request-timeout: its 10 s default is a speed assertion; one fuzzed chat request on a machine shared
        # with another test worker took longer. Failures here are about answers, not about how fast they come.
        try:
            run = CliRunner().invoke(cli, ["run", f"{server.url}/openapi.json", "--checks", "all", "--max-examples",
                                           str(EXAMPLES), *seeding, "--no-shrink", "--phases", "coverage,fuzzing",
                                           "--workers", "2", "--request-timeout", "120"],
                                           catch_exceptions=False)
        finally:
            schemathesis.hooks.unregister(filter_case)
    assert run.exit_code == 0, run.output[-15000:]
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


# --- the hook drops exactly the valid requests the server refuses for limits stated in words -------------

# The codes of those refusals (invalid_prompt: a prompt that fills the context), and min_tokens over max_tokens
# (invalid_value, told by its message).
STATED = {"invalid_prompt", "context_length_exceeded", "too_many_logprobs"}


@st.composite
def limit_bodies(draw) -> tuple[str, dict]:
    """(route, body) with the fields those limits read, from small to past them (the test keeps those the
    document calls valid)."""
    path = draw(st.sampled_from(sorted(DEFAULT_MAX_TOKENS)))
    maybe = lambda s: st.none() | s  # noqa: E731
    edges = lambda lo, hi: st.sampled_from([lo, hi]) | st.integers(lo, hi)  # noqa: E731  (the limits sit at edges)
    if draw(st.booleans()):  # near the logprob bound: many samples, many logprobs, long prompts or outputs
        edges = lambda lo, hi: st.integers(max(lo, (hi * 3) // 4), hi)  # noqa: E731
    size = edges(0, CONTEXT + 8)
    body = {"stream": True, "max_tokens": draw(maybe(edges(0, CONTEXT - 1))),
            "min_tokens": draw(maybe(st.integers(0, 8) | st.integers(0, CONTEXT - 1)))}
    if path == "/v1/chat/completions":
        body |= {"messages": [{"role": "user", "content": "x" * draw(size)}], "logprobs": draw(st.booleans()),
                 "n": draw(maybe(edges(1, 16))), "top_logprobs": draw(maybe(edges(0, 20)))}
        if body["max_tokens"] is None:
            body["max_completion_tokens"] = draw(maybe(edges(1, CONTEXT - 1)))
    else:
        body |= {"prompt": draw(st.just("x" * draw(size)) | st.just([7] * max(1, draw(size)))),
                 "logprobs": draw(maybe(edges(0, 20)))}
        body |= {"n": draw(maybe(edges(1, 16))), "echo": draw(st.booleans())} if path == "/v1/completions" \
            else {"prompt_logprobs": draw(maybe(edges(0, 20)))}
    return path, body


@pytest.fixture(scope="module")
def request_validators(server) -> dict[str, jsonschema.Draft202012Validator]:
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    return {path: jsonschema.Draft202012Validator({**document["paths"][path]["post"]["requestBody"]["content"][
        "application/json"]["schema"], "components": document["components"]}) for path in DEFAULT_MAX_TOKENS}


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_the_hook_drops_exactly_the_valid_requests_the_server_refuses_for_stated_limits(server, request_validators,
                                                                                         data):
    """breaks_stated_limits (the hook's filter) against the server, on document-valid requests around the limits
    the document states in words (prompt tokens, max_tokens, min_tokens, logprob entries): dropped iff the
    server refuses it for one of those. Streamed, and closed at the first byte: an accepted request's answer
    is not waited for."""
    path, body = data.draw(limit_bodies())
    hypothesis.assume(request_validators[path].is_valid(body))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        dropped = breaks_stated_limits(client, path, body, CONTEXT)
        with client.stream("POST", path, json=body) as r:
            error = json.loads(r.read())["error"] if r.status_code >= 400 else None
    if dropped:
        assert error and (error["code"] in STATED or "'min_tokens' must be at most" in error["message"]), (body, error)
    else:
        assert r.status_code == 200, (body, error)


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


@settings(max_examples=100, deadline=None, derandomize=True)
@given(ignore_eos=st.booleans(), min_tokens=st.integers(0, 8) | st.sampled_from([0.0, 3.0]),
       route=st.sampled_from(GENERATING), kind=st.sampled_from(["json_object", "json_schema"]))
def test_a_grammar_excludes_the_same_fields_with_the_same_message_in_the_engine_and_the_api(ignore_eos, min_tokens,
                                                                                           route, kind):
    """One rule (sampling_params.GRAMMAR_EXCLUDES): the engine (SamplingParams.validate, for in-process users)
    and the API's body rules refuse the same combinations, with the same message."""
    engine = api = None
    try:
        SamplingParams(max_tokens=8, ignore_eos=ignore_eos, min_tokens=int(min_tokens), grammar=object()).validate()
    except InvalidSamplingParams as e:
        engine = str(e)
    try:
        check_rules({"response_format": {"type": kind}, "ignore_eos": ignore_eos, "min_tokens": min_tokens}, route)
    except APIError as e:
        assert (e.status, e.code) == (400, "unsupported_combination")
        api = e.message
    assert engine == api


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
