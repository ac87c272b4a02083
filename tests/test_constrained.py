"""Constrained decoding (response_format, issue 11): the mechanics on tiny-random, in-process. Over HTTP:
test_api_constrained.py; the real model through the openai client: test_api_real.py.

tiny-random is a random model: left alone it writes byte noise, so any JSON it produces under a grammar is the
grammar's doing.
"""
import asyncio
import json

import jsonschema
import pytest
import torch

from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.generate import generate
from model_runner.grammar import GrammarError, apply_grammar_masks
from model_runner.sampling_params import SamplingParams

from .engine_helpers import collect

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
    # the shared prompt, one tail each, one more
    engine = Engine(r, BatcherConfig(num_kv_blocks=len(prompt) // r.block_size + 4))
    await engine.start()
    try:
        streams = await engine.add_parallel_requests(prompt, params, 3)
        results = await asyncio.gather(*(collect(s) for s in streams))
        preemptions = engine.scheduler.stats.preemptions
    finally:
        await engine.stop()
    assert engine.kv.num_used == 0
    for _, text, final in results:
        assert final.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert preemptions > 0
