"""Constrained decoding (response_format, issue 11): the mechanics on tiny-random, in-process and over HTTP.

tiny-random is a random model: left alone it writes byte noise, so any JSON it produces under a grammar is the
grammar's doing. The real model through the openai client is in test_api_real.py.
"""
import asyncio
import json

import httpx
import jsonschema
import pytest
import torch

from batcher.config import BatcherConfig
from batcher.engine import Engine
from model_runner.generate import generate
from model_runner.grammar import GrammarError, apply_grammar_masks
from model_runner.sampling_params import SamplingParams

from .engine_helpers import collect, kv_blocks
from .server_helpers import jitney_server
from .test_api import ENV, TINY, assert_error, wait_idle

# Bounded on purpose: every value has a short form, so even a random model reaches the closing brace.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "tags"], "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}}}}
BOOL = {"type": "object", "additionalProperties": False, "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}


def text_of(runner, seq) -> str:
    return runner.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)


def test_outputs_parse_and_match_greedy_and_sampled_and_plain_rows_are_untouched(tiny_runner):
    r = tiny_runner
    grammar = r.grammars.json_schema(SCHEMA)
    prompt = r.tokenizer("Hi", add_special_tokens=False)["input_ids"]
    plain = SamplingParams(max_tokens=12, temperature=1.0, seed=5)
    alone = generate(r, [prompt], [plain])[0].output_token_ids
    params = [SamplingParams(max_tokens=100, grammar=grammar)] + [
        SamplingParams(max_tokens=100, temperature=1.0, seed=s, grammar=grammar) for s in range(4)] + [plain]
    seqs = generate(r, [prompt] * len(params), params)
    for s in seqs[:-1]:
        assert s.finish_reason.value == "stop", text_of(r, s)
        jsonschema.validate(json.loads(text_of(r, s)), SCHEMA)
        assert s.matcher.is_stopped() and not s.matcher.get_error()  # it took every token, the last an EOS
    assert len({text_of(r, s) for s in seqs[1:-1]}) > 1  # each sample follows the grammar on its own
    assert seqs[-1].output_token_ids == alone  # a seeded row without a grammar is exactly what it is alone


def test_mask_sets_only_forbidden_logits_of_rows_with_a_matcher(tiny_runner):
    grammar = tiny_runner.grammars.json_schema(BOOL)
    logits = torch.randn(3, tiny_runner.model_config.vocab_size)
    before = logits.clone()
    apply_grammar_masks(logits, [None, grammar.matcher(), None], tiny_runner.grammars.mask_words)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])  # bit for bit
    allowed = logits[1].isfinite().nonzero().view(-1).tolist()
    assert [tiny_runner.tokenizer.decode([t]) for t in allowed] == ["{"]  # compact JSON: the object opens
    assert torch.equal(logits[1, allowed], before[1, allowed])


def test_max_tokens_cuts_the_document_with_finish_reason_length(tiny_runner):
    """As vLLM: the grammar does not shorten the output to fit max_tokens; a cut document says "length"."""
    r = tiny_runner
    prompt = r.tokenizer("Hi", add_special_tokens=False)["input_ids"]
    seq = generate(r, [prompt], SamplingParams(max_tokens=3, grammar=r.grammars.json_schema(SCHEMA)))[0]
    assert seq.finish_reason.value == "length" and seq.num_output_tokens == 3
    assert text_of(r, seq).startswith('{"')  # the start of a document, not a whole one
    with pytest.raises(json.JSONDecodeError):
        json.loads(text_of(r, seq))


def test_bad_schemas_are_refused_and_good_ones_cached(tiny_runner):
    c = tiny_runner.grammars
    for bad in ({"type": 5}, {"not": {"type": "string"}}, {"type": "string", "pattern": "(a"},
                {"$ref": "#/nowhere"}, {"type": "string", "format": "no-such-format"}):
        with pytest.raises(GrammarError):
            c.json_schema(bad)
    assert c.json_schema(dict(BOOL)) is c.json_schema(json.loads(json.dumps(BOOL)))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(grammar=c.json_schema(BOOL), ignore_eos=True).validate()


async def test_parallel_samples_and_preemption_keep_their_own_matchers(tiny_runner):
    """n = 3 samples share the prompt's blocks and each has its own matcher; with a cache small enough to force
    recompute preemption, each still parses, and every block comes back."""
    r = tiny_runner
    prompt = r.tokenizer("a longer prompt, long enough to fill a few blocks " * 2, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3, grammar=r.grammars.json_schema(SCHEMA))
    with kv_blocks(r, len(prompt) // r.block_size + 4) as alloc:  # the shared prompt, one tail each, one more
        engine = Engine(r, BatcherConfig())
        await engine.start()
        try:
            streams = await engine.add_parallel_requests(prompt, params, 3)
            results = await asyncio.gather(*(collect(s) for s in streams))
            preemptions = engine.scheduler.stats.preemptions
        finally:
            await engine.stop()
        assert alloc.num_used == 0
    for _, text, final in results:
        assert final.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert preemptions > 0


# --- over HTTP ------------------------------------------------------------------------------------------------

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
