"""Logprobs and prompt logprobs through the engine, against transformers on the same weights (tiny-random, float32).

Bound: test_model_reference holds our logits to transformers' within 1e-4 of the largest |logit| (float32
rounding in a different summation order, through two layers). log_softmax(x)_j = x_j - logsumexp(x) moves by
at most twice the largest change of any logit, so logprobs must agree within 2e-4 x max|logit|.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.generate import kv_manager
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

PROMPTS = ["The capital of France is", "1, 2, 3, 4, 5,", "Once upon a time, in a small village by the sea,"]
N, K = 12, 5


@pytest.fixture(scope="module")
def hf(tiny_runner):
    return AutoModelForCausalLM.from_pretrained(tiny_runner.model_path, dtype=torch.float32).eval()


def hf_logprobs(hf, ids):
    """transformers' float32 log_softmax at every position of ids, and the tolerance derived above."""
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1), 2e-4 * logits.abs().max().item()


def assert_entry_matches(entry, ref_row, token, tol):
    assert entry.token_id == token
    assert abs(entry.logprob - ref_row[token].item()) < tol
    ref_top = ref_row.topk(len(entry.top)).values
    # Values, not ids: ids of near-tied tokens may swap order; each listed id must carry its own logprob.
    assert all(abs(a - b) < tol for a, b in zip([lp for _, lp in entry.top], ref_top.tolist()))
    assert all(abs(lp - ref_row[i].item()) < tol for i, lp in entry.top)


async def outputs_of(runner, prompts, params, cfg=None):
    """Every RequestOutput of each request (the logprobs ride on them)."""
    engine = Engine(runner, cfg or BatcherConfig())
    await engine.start()
    try:
        streams = [await engine.add_request(p, q) for p, q in zip(prompts, params)]
        return [[out async for out in s] for s in streams]
    finally:
        await engine.stop()


async def test_greedy_logprobs_match_transformers(tiny_runner, hf):
    prompts = [tiny_runner.tokenizer(p)["input_ids"] for p in PROMPTS]
    params = [SamplingParams(max_tokens=N, ignore_eos=True, logprobs=K, prompt_logprobs=K) for _ in prompts]
    # A small token budget chunks the longer prompts: prompt logprobs must come out whole across chunks.
    runs = await outputs_of(tiny_runner, prompts, params, BatcherConfig(max_num_batched_tokens=16))
    for prompt, outs in zip(prompts, runs):
        tokens = [t for o in outs for t in o.token_ids]
        sampled = [e for o in outs for e in (o.logprobs or [])]
        prompt_lps = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
        assert len(tokens) == N and len(sampled) == N and len(prompt_lps) == 1  # the prompt's, once
        ref, tol = hf_logprobs(hf, prompt + tokens)
        assert prompt_lps[0][0] is None and len(prompt_lps[0]) == len(prompt)
        for i, entry in enumerate(prompt_lps[0][1:], start=1):
            assert_entry_matches(entry, ref[i - 1], prompt[i], tol)
        for j, entry in enumerate(sampled):
            assert_entry_matches(entry, ref[len(prompt) - 1 + j], tokens[j], tol)
            assert entry.top[0][0] == tokens[j] or entry.top[0][1] - entry.logprob < tol  # greedy = the top one


async def test_logprobs_are_of_the_raw_distribution(tiny_runner, hf):
    """A +100 bias forces a token; its reported logprob is still the model's own (vLLM's raw_logprobs), not ~0."""
    prompt = tiny_runner.tokenizer(PROMPTS[0])["input_ids"]
    forced = 65
    params = [SamplingParams(max_tokens=3, ignore_eos=True, logprobs=0, logit_bias={forced: 100.0},
                             presence_penalty=1.0, temperature=0.0)]
    (outs,) = await outputs_of(tiny_runner, [prompt], params)
    entries = [e for o in outs for e in o.logprobs]
    ref, tol = hf_logprobs(hf, prompt + [forced] * 3)
    for j, entry in enumerate(entries):
        assert entry.token_id == forced and entry.top == []
        assert abs(entry.logprob - ref[len(prompt) - 1 + j, forced].item()) < tol and entry.logprob < -1


async def test_scoring_only_with_max_tokens_0(tiny_runner, hf):
    """max_tokens 0 + prompt_logprobs: the prompt is scored, nothing generated, every block given back; the
    prefix cache (a plain request warmed it first) must not skip the positions whose logprobs are wanted."""
    prompt = tiny_runner.tokenizer(PROMPTS[2] * 2)["input_ids"]  # several full blocks: cacheable
    plain = SamplingParams(max_tokens=2, ignore_eos=True)
    score = SamplingParams(max_tokens=0, prompt_logprobs=1)
    engine = Engine(tiny_runner, BatcherConfig())
    await engine.start()
    try:
        async for _ in await engine.add_request(prompt, plain):  # warms the prefix cache with this prompt
            pass
        outs = [out async for out in await engine.add_request(prompt, score)]
        stats = engine.stats()
    finally:
        await engine.stop()
    final = outs[-1]
    assert final.finished and final.num_output_tokens == 0 and final.finish_reason == "length"
    lps = [o.prompt_logprobs for o in outs if o.prompt_logprobs][0]
    ref, tol = hf_logprobs(hf, prompt)
    assert lps[0] is None and all(e is not None for e in lps[1:])
    for i, entry in enumerate(lps[1:], start=1):
        assert_entry_matches(entry, ref[i - 1], prompt[i], tol)
    assert engine.scheduler.num_blocks_used == 0 and stats.kv_blocks_used == 0


async def test_no_logprobs_asked_none_computed(tiny_runner):
    (outs,) = await outputs_of(tiny_runner, [[5, 6, 7]], [SamplingParams(max_tokens=4, ignore_eos=True)])
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in outs)
    kv = kv_manager(tiny_runner)  # and a step of the runner itself returns none
    seq = Sequence([5, 6, 7], SamplingParams(max_tokens=4))
    assert kv.allocate_slots(seq, 3)
    try:
        step = tiny_runner.execute([(seq, 3)])
    finally:
        kv.free(seq)
    assert step.logprobs == {} and step.tokens[0] is not None
