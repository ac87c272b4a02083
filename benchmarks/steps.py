"""Model steps outside the engine, for the benchmarks that time the runner itself (micro, roofline, kernels,
profile_step, ceiling): sequences that hold KV blocks for as long as a `with` block runs and give them back
after it, even when a step fails, and the prompts and step shapes they time."""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator

from batcher.generate import kv_manager, step
from batcher.kv_cache_manager import KVCacheManager
from model_runner.config import ModelConfig
from model_runner.kv_cache import kv_cache_bytes_per_block
from model_runner.precision import compute_dtype
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

WARMUP_STEPS = 2  # decode steps run before timing: the first calls of a new shape pick oneDNN kernels
PROMPT_TEXT = "The jitney leaves when it is full or when it has waited long enough, and stops at every corner. "

Plan = list[tuple[Sequence, int]]


@contextlib.contextmanager
def holding(kv: KVCacheManager, seqs: list[Sequence]) -> Iterator[list[Sequence]]:
    """The sequences, whose KV blocks (grown from kv by whatever runs inside) are all freed when the block ends."""
    try:
        yield seqs
    finally:
        for s in seqs:
            kv.free(s)


@contextlib.contextmanager
def held(runner: ModelRunner, contexts: list[int], chunks: list[int]) -> Iterator[Plan]:
    """A step's plan: sequences holding KV blocks for contexts[i] tokens, of which all but the last chunks[i]
    count as already in the cache (the cache holds whatever the blocks last held: attention costs the same
    whatever the values), each fed chunks[i] tokens."""
    vocab, kv = runner.model_config.vocab_size, kv_manager(runner)
    with holding(kv, []) as seqs:
        for i, (ctx, n) in enumerate(zip(contexts, chunks)):
            s = Sequence([3 + (i + j) % min(500, vocab - 3) for j in range(ctx)],
                         SamplingParams(max_tokens=1, ignore_eos=True))
            seqs.append(s)
            assert kv.allocate_slots(s, ctx), "raise the KV budget"
            s.num_computed_tokens = ctx - n
        yield [(s, n) for s, n in zip(seqs, chunks)]


def random_step(runner: ModelRunner, batch: int, lo: int, hi: int, chunk: int, seed: int = 0):
    """held() for `batch` sequences of lo..hi tokens of context, each fed `chunk` more tokens."""
    rng = random.Random(seed)
    return held(runner, [rng.randint(lo, hi) for _ in range(batch)], [chunk] * batch)


# --- decode and prefill of real prompts, as micro and roofline time them -------------------------------------

def make_prompts(tokenizer, batch: int, prompt_len: int) -> list[list[int]]:
    """Deterministic prompts of exactly prompt_len tokens, each different (its number leads), so no padding."""
    text = PROMPT_TEXT * (prompt_len // 4 + 1)  # more than prompt_len tokens whatever the tokenizer
    return [tokenizer(f"Rider {i}: {text}", add_special_tokens=False)["input_ids"][:prompt_len]
            for i in range(batch)]


def kv_cache_memory(mc: ModelConfig, dtype: str, max_batch: int, tokens_per_seq: int, block_size: int = 16) -> int:
    """Enough KV cache for the largest batch with a block of margin per sequence, and no more."""
    blocks = max_batch * (-(-tokens_per_seq // block_size) + 1)
    return blocks * kv_cache_bytes_per_block(mc, block_size, compute_dtype(dtype, "cpu")[0])


def mean_decode_context(prompt_len: int, gen_len: int) -> float:
    """Mean context of time_decode_step's timed steps: decode step k (warm-up included) sees prompt_len + k tokens."""
    return prompt_len + WARMUP_STEPS + (gen_len + 1) / 2


def decode_step_times(runner: ModelRunner, prompts: list[list[int]], gen_len: int) -> list[float]:
    """Seconds of each of gen_len step()s that decode one token for every sequence, after prefill and a warm-up
    (each timed alone: the fastest is what the machine does when nothing else holds a core at that moment)."""
    params = SamplingParams(max_tokens=1 + WARMUP_STEPS + gen_len, ignore_eos=True)
    kv = kv_manager(runner)
    times = []
    with holding(kv, [Sequence(p, params) for p in prompts]) as seqs:
        for _ in range(1 + WARMUP_STEPS):  # prefill (samples the first token), then warm-up decodes
            step(runner, seqs, kv)
        for _ in range(gen_len):
            t0 = time.perf_counter()
            step(runner, seqs, kv)
            times.append(time.perf_counter() - t0)
    return times


def time_decode_step(runner: ModelRunner, prompts: list[list[int]], gen_len: int) -> float:
    """Mean seconds of a step() that decodes one token for every sequence, after prefill and a warm-up."""
    return sum(decode_step_times(runner, prompts, gen_len)) / gen_len


def time_prefill(runner: ModelRunner, prompt: list[int], reps: int) -> float:
    """Mean seconds of a step() that prefills the prompt into a fresh sequence, after one warm-up prefill."""
    kv = kv_manager(runner)

    def once() -> None:
        with holding(kv, [Sequence(prompt, SamplingParams(max_tokens=1, ignore_eos=True))]) as seqs:
            step(runner, seqs, kv)

    once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t0) / reps
