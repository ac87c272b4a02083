"""The paged path: a mixed batch gives each sequence exactly the tokens it gets alone, and leaks nothing."""
import random

import pytest

from batcher.kv_cache_manager import KVCacheManager
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

from .reference import our_greedy


@pytest.fixture(params=["native", "torch"])
def runner(request, tiny_runner):
    """tiny_runner with attention by the native kernel, then by the plain PyTorch path."""
    if request.param == "native" and not tiny_runner.native_attention:
        pytest.skip("the native kernels did not build here (see the log)")
    saved, tiny_runner.native_attention = tiny_runner.native_attention, request.param == "native"
    yield tiny_runner
    tiny_runner.native_attention = saved


class ScatteredKV(KVCacheManager):
    """Every block a random free one: block tables as scattered as a long-lived cache can make them."""

    def __init__(self, num_blocks: int, block_size: int):
        super().__init__(num_blocks, block_size)
        self.rng = random.Random(0)

    def _find_run(self, seq):
        return [self.rng.choice(list(self.free_ids))]


def run_staggered(runner, jobs, chunk, alloc):
    """A hand-rolled schedule: job i joins at step jobs[i][0]; prompts are prefilled `chunk` tokens at a time,
    in the same forward as the other sequences' decodes; each sequence leaves the step it finishes."""
    step, active, done = 0, [], []
    pending = sorted(jobs, key=lambda j: j[0])
    tables_seen = []
    while pending or active:
        while pending and pending[0][0] <= step:
            _, prompt, n = pending.pop(0)
            active.append(Sequence(prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
        plan = []
        for s in active:
            todo = min(len(s) - s.num_computed_tokens, chunk)
            assert alloc.allocate_slots(s, todo)
            plan.append((s, todo))
        for (s, n), tok in zip(plan, runner.execute(plan).tokens):
            s.num_computed_tokens += n
            if tok is not None:
                s.append_token(tok, runner.eos_token_ids, runner.max_model_len)
        for s in [s for s in active if s.is_finished]:
            tables_seen.append(list(s.block_table))
            alloc.free(s)
            active.remove(s)
            done.append(s)
        step += 1
    return done, tables_seen


@pytest.mark.parametrize("layout", ["runs", "scattered"])
@pytest.mark.parametrize("chunk", [5, 10_000])  # chunked prefill across steps, and whole prompts
def test_mixed_batch_equals_alone(runner, chunk, layout):
    rng = random.Random(chunk)
    texts = ["a", "hello world", "The quick brown fox jumps over the lazy dog. " * 3, "x" * 40,
             "Once upon a time", "1 2 3 4 5 6 7 8 9 10 11 12", "abc" * 20, "z"]
    jobs = [(rng.randrange(0, 12), runner.tokenizer(t)["input_ids"], rng.randrange(1, 30)) for t in texts]
    alloc = (KVCacheManager if layout == "runs" else ScatteredKV)(runner.num_blocks, runner.block_size)
    done, tables = run_staggered(runner, jobs, chunk, alloc)
    by_prompt = {tuple(s.token_ids[: s.num_prompt_tokens]): s.output_token_ids for s in done}
    for _, prompt, n in jobs:
        assert by_prompt[tuple(prompt)] == our_greedy(runner, [prompt], n)[0]
    contiguous = [t == list(range(t[0], t[0] + len(t))) for t in tables]
    # The real allocator's runs keep every table one run here (blocks to spare); the scattered one must have
    # given the kernels tables that jump about.
    assert all(contiguous) if layout == "runs" else not all(contiguous)
    assert alloc.num_free == runner.num_blocks


def test_batch_of_many_equals_alone(runner):
    prompts = [runner.tokenizer("p" * (i + 1) + " q")["input_ids"] for i in range(20)]
    together = our_greedy(runner, prompts, 12)
    assert together == [our_greedy(runner, [p], 12)[0] for p in prompts]


def test_decode_groups_split_by_context_length():
    from model_runner.runner import decode_group_bounds
    assert decode_group_bounds([5, 9, 20], 16) == [(0, 3)]                  # short contexts: one group
    bounds = decode_group_bounds(sorted([40, 50, 300, 310, 700, 760]), 16)
    assert bounds == [(0, 2), (2, 4), (4, 6)]
    assert len(decode_group_bounds(list(range(0, 20000, 160)), 16)) == 8    # capped


def test_mixed_context_lengths_in_one_decode_step(runner):
    """Short and long contexts decoding together (several decode groups) match each alone."""
    prompts = [[3 + i % 200] * n for i, n in enumerate([2, 5, 40, 45, 200, 230, 600])]
    together = our_greedy(runner, prompts, 6)
    assert together == [our_greedy(runner, [p], 6)[0] for p in prompts]
