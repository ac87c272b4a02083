"""Prompt rows on the tiled kernel (csrc/prefill_attention.cpp), everything else on the row kernel: which rows
go where, and a bfloat16 model that gives the same logits and greedy text either way (up to bfloat16)."""
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


def test_prompt_rows_are_tiled_and_generated_rows_take_the_row_kernel():
    """Decodes first; a fresh prompt, a later chunk of one, a one-token chunk, and a preempted sequence
    recomputing its prompt and then its outputs (the outputs take the row kernel, as when they were decoded)."""
    items = [(seq(5, 3, 7), 1), (seq(5, 1, 5), 1), (seq(40, 0, 0), 40), (seq(40, 0, 16), 24), (seq(9, 0, 8), 1),
             (seq(10, 6, 0), 16), (seq(10, 6, 12), 4)]
    chunks, ranges = ModelRunner._prompt_chunks(items)
    assert chunks.tolist() == [[2, 40, 0], [42, 24, 16], [66, 1, 8], [67, 10, 0]]
    assert ranges == [(0, 2), (77, 87)]


def test_a_step_without_prompt_rows_has_no_chunks():
    chunks, ranges = ModelRunner._prompt_chunks([(seq(5, 3, 7), 1), (seq(5, 1, 5), 1)])
    assert chunks is None and ranges == [(0, 2)]


@pytest.fixture(scope="module")
def runner():
    """A tiny random model with SmolLM2's head shape (9/3 heads of 64), in bfloat16."""
    path = tiny_random_dir(cache_dir(), seed=3, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                           head_dim=64, intermediate_size=256)
    r = ModelRunner(RunnerConfig(model=str(path), dtype="bfloat16", kv_cache_memory=16 << 20), progress=False)
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
    """Prompt rows are tiled whatever their companions: a prompt's greedy text alone and in a batch of four."""
    prompts = [list(range(5, 5 + n)) for n in (3, 70, 129, 17)]
    together = our_greedy(runner, prompts, 8)
    for p, t in zip(prompts, together):
        assert our_greedy(runner, [p], 8)[0] == t
