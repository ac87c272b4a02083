"""No request stalls the event loop: work that grows with a request's size runs off it, large texts are refused
by their size before they are tokenized, and an answer's logprob entries are bounded (api/offload.py,
api/looplag.py, fields.MAX_LOGPROB_ENTRIES).

The server test drives the largest input of every kind the API accepts, and watches the loop's own lag from
inside the server (jitney_event_loop_lag_seconds), while a probe calls /health every 10 ms. The pieces it rests
on are tested as properties over generated inputs: the byte bound never exceeds a text's real token count, the
GIL-free encode gives the same ids, JSON built in pieces is byte for byte json.dumps', and the logprob bound
holds for every combination of n, prompt, max_tokens and logprobs.
"""
from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.chat import chat_prompt_ids
from api.errors import APIError
from api.app import ServerSettings
from api.offload import PrepThread, byte_bound, json_pieces, json_text
from api.response_format import schema_source
from api.fields import LOGPROB_PRODUCT, MAX_LOGPROB_ENTRIES
from api.schemas import Model, logprob_entries, sampling_params
from model_runner.grammar import ANNOTATIONS, GrammarCompiler
from model_runner.loader import load_tokenizer, resolve_model
from model_runner.text import GIL_FREE_CHARS, encode, encode_offsets
from model_runner.tiny import CHAT_TEMPLATE, byte_level_tokenizer

from .server_helpers import jitney_server, parse_metrics

TOKENIZERS = ("tiny", "smollm2")


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request):
    if request.param == "tiny":
        return byte_level_tokenizer()
    return load_tokenizer(resolve_model("smollm2-135m", progress=False))


@pytest.fixture(scope="module")
def bound(tokenizer):
    bound = byte_bound(tokenizer)
    assert bound is not None  # both are byte-level BPEs, which the bound covers
    return bound


# Text that is hard on a byte-level BPE: runs that the longest tokens cover, special-token text, bytes some
# vocabularies have no token for (SmolLM2 drops \x04 and the lead byte of U+40000), astral characters.
PIECES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\x04", "\x1d", "\U00040000", "\U0001f600", "é", "中",
          "#" * 80, "\n" + " " * 79, " " * 64, "-" * 64, "=" * 65, "the", " of", "\n", " ", "a", "0"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=60).map("".join)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_a_texts_size_never_claims_more_tokens_than_it_has(tokenizer, bound, text):
    """The bound that refuses a text before tokenizing it is sound: ceil(bytes / longest token) <= tokens, for
    the text read raw (special-token text as special tokens) and split (as chat content is)."""
    for split in (False, True):
        assert bound.min_tokens(text) <= len(encode(tokenizer, text, split_special_tokens=split)), (text, split)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(texts, min_size=1, max_size=4))
def test_a_chats_rendering_never_claims_more_tokens_than_it_has(tokenizer, bound, contents):
    """Chat: the bound is checked on the template's rendering, and chat_prompt_ids tokenizes all of that text
    (in pieces, the contents split): the bound holds for what it returns."""
    if tokenizer.chat_template is None:  # the tiny model's directory carries it; the bare tokenizer does not
        tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    try:
        ids = chat_prompt_ids(messages, tokenizer)
    except APIError:  # refused (special-token text the template rewrites): nothing was counted
        return
    assert bound.min_tokens(text) <= len(ids)


def test_the_bound_is_none_where_it_cannot_be_shown():
    """A normalizer may delete text, an added token with lstrip swallows any run of spaces: no bound then."""
    from tokenizers import AddedToken, normalizers
    tok = byte_level_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.StripAccents()
    assert byte_bound(tok) is None
    tok = byte_level_tokenizer()
    tok.add_tokens([AddedToken("<x>", lstrip=True)])
    assert byte_bound(tok) is None


def test_a_long_text_is_encoded_without_the_gil(tokenizer):
    """Encoding a long text on a thread lets the event loop run: a ticking thread gets the GIL while the encode
    runs (with the GIL held all along, it gets none between the encode's start and end). The text is long
    enough that the encode outlasts the 5 ms switch interval on any machine."""
    text = "".join(random.Random(0).choice("abcdefgh ijklmnopqrstuvwxyz.\n") for _ in range(1 << 18))
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.01)
    start = time.perf_counter()
    encode(tokenizer, text)
    end = time.perf_counter()
    stop.set()
    ticker.join()
    inside = [t for t in ticks if start + 0.1 * (end - start) < t < end - 0.1 * (end - start)]
    assert inside, f"no other thread ran during a {end - start:.3f} s encode: it held the GIL"


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, copies=st.integers(1, 3))
def test_the_gil_free_encode_gives_the_same_ids_and_offsets(tokenizer, text, copies):
    """Texts over GIL_FREE_CHARS take encode_batch: the same ids and offsets as the plain encode."""
    text = (text or "x") * (GIL_FREE_CHARS // max(len(text), 1) + copies)
    assert len(text) > GIL_FREE_CHARS
    backend = tokenizer.backend_tokenizer
    for split in (False, True):
        backend.encode_special_tokens = split
        plain = backend.encode(text, add_special_tokens=False)
        assert encode(tokenizer, text, split_special_tokens=split) == plain.ids
    backend.encode_special_tokens = False
    plain = backend.encode(text, add_special_tokens=False)
    assert encode_offsets(tokenizer, text) == (plain.ids, plain.offsets)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=4), inner, max_size=20),
    max_leaves=200)


@settings(max_examples=100, deadline=None, database=None)
@given(value=json_values, compact=st.booleans())
def test_json_in_pieces_is_json_dumps(value, compact):
    """The prep thread serializes in pieces; the bytes are exactly those of one json.dumps call (Starlette's
    JSONResponse rendering, or json.dumps' own style for Server-Sent Events)."""
    style = {"separators": (",", ":"), "allow_nan": False} if compact else {}
    out: list[str] = []
    json_pieces(value, out, compact)
    assert "".join(out) == json.dumps(value, ensure_ascii=False, **style)


def test_json_text_is_in_pieces_only_on_the_prep_thread():
    import asyncio
    prep = PrepThread(byte_level_tokenizer())
    value = {"a": list(range(5000))}

    async def both():
        return json_text(value), await prep.run(json_text, value)
    try:
        here, there = asyncio.run(both())
    finally:
        prep.close()
    assert here == there == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


schema_keys = st.sampled_from(sorted(ANNOTATIONS) + ["type", "properties", "items", "anyOf", "enum", "const",
                                                      "$defs", "not", "p", "", "é"]) | st.text(max_size=3)
schemas = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(schema_keys, inner, max_size=20),
    max_leaves=200)


@settings(max_examples=60, deadline=None, database=None)  # recursive schemas: 200 took 20 s of the suite
@given(schema=st.dictionaries(schema_keys, schemas, max_size=8), limit=st.integers(0, 3000))
def test_a_schemas_key_is_made_within_its_limit(schema, limit):
    """response_format's key, made in work bounded by the limit (schema_source): the very text the compiler's
    cache is keyed by (annotations left out), or None exactly when that is longer than the limit."""
    key = GrammarCompiler.key(schema)
    assert schema_source(schema, limit) == (key if len(key) <= limit else None)


# --- the bound on logprob entries ------------------------------------------------------------------------

MODEL = Model(max_model_len=1024, vocab_size=320)


def body_for(route: str, max_tokens, logprobs, prompt_logprobs, echo) -> dict:
    body = {"max_tokens": max_tokens}
    if route == "/generate":
        body |= {"logprobs": logprobs, "prompt_logprobs": prompt_logprobs}
    elif route == "/v1/completions":
        body |= {"logprobs": logprobs, "echo": echo}
    else:
        body |= {"logprobs": logprobs is not None, "top_logprobs": logprobs}
    return body


@settings(max_examples=300, deadline=None, database=None)
@given(route=st.sampled_from(sorted(LOGPROB_PRODUCT)), n=st.integers(1, 16), prompt_len=st.integers(1, 1023),
       max_tokens=st.one_of(st.none(), st.integers(1, 1023)), logprobs=st.one_of(st.none(), st.integers(0, 20)),
       prompt_logprobs=st.one_of(st.none(), st.integers(0, 20)), echo=st.booleans())
def test_an_answers_logprob_entries_are_bounded(route, n, prompt_len, max_tokens, logprobs, prompt_logprobs, echo):
    """Any accepted request's answer holds at most MAX_LOGPROB_ENTRIES logprob entries; one that asks for more
    is a 422 naming its fields and the limit; a default max_tokens is lowered to fit instead of refused."""
    if route == "/generate":
        n = 1
    if max_tokens is not None and prompt_len + max_tokens > MODEL.max_model_len:
        max_tokens = MODEL.max_model_len - prompt_len
    body = body_for(route, max_tokens, logprobs, prompt_logprobs, echo)
    try:
        params = sampling_params(body, route, MODEL, prompt_len, 16 if route != "/v1/chat/completions" else 1023, n)
    except APIError as e:
        assert e.status == 422 and e.code == "too_many_logprobs", e.message
        assert f"{MAX_LOGPROB_ENTRIES:,}" in e.message and LOGPROB_PRODUCT[route] in e.message
        fixed = logprob_entries(route, n, prompt_len, 1 if max_tokens is None else max_tokens, params_lp(route, body),
                                params_plp(route, body))
        assert fixed > MAX_LOGPROB_ENTRIES
        return
    assert logprob_entries(route, n, prompt_len, params.max_tokens, params.logprobs,
                           params.prompt_logprobs) <= MAX_LOGPROB_ENTRIES
    if max_tokens is not None:
        assert params.max_tokens == max_tokens  # a given max_tokens is never cut


def params_lp(route: str, body: dict):
    return body.get("top_logprobs") if route == "/v1/chat/completions" else body.get("logprobs")


def params_plp(route: str, body: dict):
    if route == "/generate":
        return body.get("prompt_logprobs")
    return body.get("logprobs") if route == "/v1/completions" and body.get("echo") else None


# --- the server: the largest inputs, and the loop's lag ------------------------------------------------

BODY_LIMIT = 256 << 10  # the bodies of most kinds below; the server keeps its default limit, DEFAULT_LIMIT
DEFAULT_LIMIT = ServerSettings.max_body_bytes
STALL_S = 0.1  # the acceptance: no event-loop stall over 100 ms


def big_text(nbytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "of", "jitney", "é", "中文", "<|im_end|>", "\n", "  ", "x" * 12, "🙂"]
    out, size = [], 0
    while size < nbytes:
        w = rng.choice(words) + " "
        out.append(w)
        size += len(w.encode())
    return "".join(out)[: nbytes // 4]  # at most nbytes bytes, whatever the characters


def fill(make, limit: int, most: int | None = None) -> bytes:
    """The largest body make(k) (JSON) under limit bytes, by bisection on k (at most `most`, if given)."""
    lo, hi = 1, most or limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(json.dumps(make(mid), ensure_ascii=False).encode()) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return json.dumps(make(lo), ensure_ascii=False).encode()


def largest_inputs() -> dict[str, tuple[str, bytes]]:
    """The largest input of every kind the API accepts (each up to the server's body limit), by route."""
    limit = BODY_LIMIT - 64
    text = lambda k: big_text(4 * k)  # noqa: E731
    per_turn = BODY_LIMIT // 1024 - 40
    turns = lambda k: [{"role": ("user", "assistant")[i % 2], "content": big_text(min(k, per_turn) * 4, i)}  # noqa
                       for i in range(1024)]
    entries = MAX_LOGPROB_ENTRIES // (1023 * 21)  # n: the most samples of a 1023-token prompt, echoed with 20
    # (a property takes over 20 bytes: the bisection for k starts at limit / 20)
    schema = lambda k: {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(k)}}  # noqa
    return {
        "completion: a text prompt": ("/v1/completions", fill(lambda k: {"prompt": text(k), "max_tokens": 1}, limit)),
        "generate: a text prompt": ("/generate", fill(lambda k: {"prompt": text(k), "max_tokens": 1}, limit)),
        "completion: a prompt of token ids": ("/v1/completions", fill(lambda k: {"prompt": [7] * k}, limit)),
        "chat: one long message": ("/v1/chat/completions", fill(
            lambda k: {"messages": [{"role": "user", "content": text(k)}], "max_tokens": 1}, limit)),
        "chat: 1024 messages": ("/v1/chat/completions", fill(lambda k: {"messages": turns(k), "max_tokens": 1}, limit)),
        "tokenize: a text": ("/tokenize", fill(lambda k: {"prompt": text(k)}, limit)),
        "tokenize: a chat": ("/tokenize", fill(lambda k: {"messages": [{"role": "user", "content": text(k)}]}, limit)),
        "detokenize: a body of ids": ("/detokenize", fill(lambda k: {"tokens": [7] * k}, limit)),
        "detokenize: the most tokens": ("/detokenize", json.dumps({"tokens": list(range(3, 259)) * 4}).encode()),
        "completion: n x echo x logprobs": ("/v1/completions", json.dumps(
            {"prompt": [7] * 1023, "echo": True, "logprobs": 20, "max_tokens": 0, "n": entries}).encode()),
        "completion: n x echo x logprobs, streamed": ("/v1/completions", json.dumps(
            {"prompt": [7] * 1023, "echo": True, "logprobs": 20, "max_tokens": 0, "n": entries,
             "stream": True}).encode()),
        "chat: n x max_tokens x top_logprobs": ("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "n": 16, "logprobs": True, "top_logprobs": 20,
             "max_tokens": MAX_LOGPROB_ENTRIES // (16 * 21), "ignore_eos": True}).encode()),
        "response_format: a schema": ("/v1/completions", fill(lambda k: {
            "prompt": "x", "max_tokens": 1, "response_format": {"type": "json_schema", "json_schema": {
                "name": "s", "schema": schema(k)}}}, limit, limit // 20)),
        # The one kind whose work on the loop (the schema's key) grew with the body after the rest moved off it:
        # checked at the default body limit too (the key's work now stops at MAX_SCHEMA_CHARS).
        "response_format: a schema, at the default body limit": ("/v1/completions", fill(lambda k: {
            "prompt": "x", "max_tokens": 1, "response_format": {"type": "json_schema", "json_schema": {
                "name": "s", "schema": schema(k)}}}, DEFAULT_LIMIT - 64, DEFAULT_LIMIT // 20)),
    }


def stalls(client: httpx.Client, url: str) -> float:
    """Event-loop stalls over STALL_S seen by the server so far (its lag histogram's count above the bucket)."""
    m = parse_metrics(client.get(f"{url}/metrics").text)
    name = "jitney_event_loop_lag_seconds"
    return m[(f"{name}_count", ())] - m[(f"{name}_bucket", (("le", str(STALL_S)),))]


@pytest.fixture(scope="module")
def server():
    with jitney_server() as server:  # the default body limit (1 MiB)
        yield server


def test_no_input_stalls_the_event_loop(server):
    """Every kind of largest input, sent while a probe calls /health every 10 ms: the server's loop never falls
    more than STALL_S behind.

    The measure is the loop's own lag, taken inside the server (a timer every 20 ms and how late it fires),
    not the probe's round trips: those also count the test process's scheduling and, on a machine shared with
    other work, any pause of either process. A stall caused by a request recurs every time it is sent, while
    a pause the machine imposes is chance: so a kind that shows a stall is sent again, up to three times, and
    fails only if every run stalled. The probe's worst round trip is reported alongside. Bodies are 256 KiB
    to keep the test short (work on the loop grows with the body, so the old code's stalls are already seconds
    at this size, and off the loop there is none at any size); a schema is sent at the default 1 MiB as well."""
    inputs = largest_inputs()
    with httpx.Client(timeout=300) as client, httpx.Client(timeout=30) as probe_client:
        url = server.url
        rtts: list[float] = []
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                t = time.perf_counter()
                probe_client.get(f"{url}/health")
                rtts.append(time.perf_counter() - t)
                time.sleep(0.01)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        report, stalled = [], []
        try:
            client.post(f"{url}/generate", json={"prompt": "warm", "max_tokens": 2})
            for kind, (route, body) in inputs.items():
                for attempt in range(3):
                    before, n_rtt = stalls(client, url), len(rtts)
                    t = time.perf_counter()
                    r = client.post(f"{url}{route}", content=body, headers={"Content-Type": "application/json"})
                    took = time.perf_counter() - t
                    time.sleep(0.05)  # the lag timer reports a stall when it next fires
                    seen = stalls(client, url) - before
                    worst = max(rtts[n_rtt:], default=0.0)
                    report.append(f"{kind}: {len(body):,} B -> {r.status_code} in {took:.2f} s, stalls {seen:g}, "
                                  f"worst /health {1000 * worst:.0f} ms")
                    assert r.status_code < 500, (kind, r.text[:300])
                    if not seen:
                        break
                else:
                    stalled.append(kind)
        finally:
            stop.set()
            prober.join()
        print("\n".join(report))
        assert not stalled, "the event loop stalled over {:.0f} ms on every try of: {}\n{}".format(
            1000 * STALL_S, ", ".join(stalled), "\n".join(report))


def test_too_many_logprob_entries_is_a_422_and_the_contract_says_so(server):
    """Over HTTP: the 422 names the fields and the limit, and /openapi.json's descriptions state the bound."""
    with httpx.Client(timeout=60) as client:
        r = client.post(f"{server.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "n": 16, "logprobs": True, "top_logprobs": 20,
            "max_tokens": MAX_LOGPROB_ENTRIES // (16 * 21) + 1})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "too_many_logprobs"
        assert LOGPROB_PRODUCT["/v1/chat/completions"] in error["message"]
        assert f"{MAX_LOGPROB_ENTRIES:,}" in error["message"]
        doc = client.get(f"{server.url}/openapi.json").text
        for route, product in LOGPROB_PRODUCT.items():
            assert json.dumps(product)[1:-1] in doc or product in doc, route
