"""Multi-token chunks on the tiled kernel (csrc/prefill_attention.cpp), decodes on the row kernel: which rows go
where, and a bfloat16 model, over a bfloat16 or an int8 KV cache, that gives the same logits and greedy text
either way (up to bfloat16)."""
import pytest
import torch

from model_runner import native
from model_runner.config import RunnerConfig
from model_runner.paths import cache_dir
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence
from model_runner.tiny import tiny_random_dir

from .reference import our_greedy, our_logits


def seq(prompt: int, outputs: int, computed: int) -> Sequence:
    s = Sequence(list(range(1, prompt + 1)), SamplingParams(max_tokens=outputs + 1))
    for t in range(outputs):
        s.append_token(7 + t, (), 1000)
    s.num_computed_tokens = computed
    return s


def test_multi_token_chunks_are_tiled_and_decodes_take_the_row_kernel():
    """Decodes first (as execute orders a step); then a fresh prompt, a later chunk of one, and a preempted
    sequence recomputing its prompt and outputs: every multi-token chunk tiled, from its first position."""
    items = [(seq(5, 3, 7), 1), (seq(5, 1, 5), 1), (seq(40, 0, 0), 40), (seq(40, 0, 16), 24),
             (seq(10, 6, 0), 16)]
    chunks, decodes = ModelRunner._chunks(items)
    assert decodes == 2
    assert chunks.tolist() == [[2, 40, 0], [42, 24, 16], [66, 16, 0]]


def test_a_step_of_decodes_has_no_chunks():
    assert ModelRunner._chunks([(seq(5, 3, 7), 1), (seq(5, 1, 5), 1)]) == (None, 2)


@pytest.fixture(scope="module", params=["bfloat16", "int8"], ids=["bf16-cache", "int8-cache"])
def runner(request):
    """A tiny random model with SmolLM2's head shape (9/3 heads of 64), in bfloat16, over a bfloat16 or an int8
    KV cache (both tiled)."""
    path = tiny_random_dir(cache_dir(), seed=3, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                           head_dim=64, intermediate_size=256)
    r = ModelRunner(RunnerConfig(model=str(path), dtype="bfloat16", kv_cache_dtype=request.param,
                                 kv_cache_memory=16 << 20), progress=False)
    if not r.tiled_prefill:
        pytest.skip("the tiled kernel runs on AVX512-BF16 only (bfloat16 compute)")
    return r


def test_logits_agree_with_the_row_kernel_to_bfloat16(runner):
    """Every position's logits with prompts tiled and with every row on the row kernel: the two differ only by
    the kernels' roundings (bfloat16 weights in the tiled second product), which move bfloat16 logits by a few
    of their own ulps; the bound is 2^-5 of the logits' range, about four bfloat16 ulps at that magnitude."""
    ids = list(range(3, 300, 2))
    tiled = our_logits(runner, ids)
    runner.tiled_prefill = False
    try:
        rows = our_logits(runner, ids)
    finally:
        runner.tiled_prefill = True
    span = (rows.max() - rows.min()).item()
    assert (tiled - rows).abs().max().item() <= span * 2.0 ** -5
    assert (tiled.argmax(-1) == rows.argmax(-1)).float().mean() >= 0.95


def test_batched_prompts_give_each_the_text_it_gets_alone(runner):
    """A prompt's greedy text alone and in a batch of four, its prompt tiled and its decodes on the row kernel
    both times."""
    prompts = [list(range(5, 5 + n)) for n in (3, 70, 129, 17)]
    together = our_greedy(runner, prompts, 8)
    for p, t in zip(prompts, together):
        assert our_greedy(runner, [p], 8)[0] == t
