"""The simplest complete use of the runner: run a set of prompts together to the end (a static batch).

The serving engine is engine.py; this loop is for the one-shot CLI, the micro-benchmarks and tests. Each step
feeds every unfinished sequence its next tokens (whole prompt first, then one token), and a sequence that
finishes gives its KV blocks back at once. Each call takes its blocks from a KVCacheManager of its own over
the runner's whole cache (or the one given): run it only while no engine is using the same runner.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from model_runner.errors import InvalidRequestError
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

from .kv_cache_manager import KVCacheManager


def kv_manager(runner: ModelRunner) -> KVCacheManager:
    """A manager over all of the runner's blocks, without prefix caching (a one-shot batch shares nothing)."""
    return KVCacheManager(runner.num_blocks, runner.block_size)


def step(runner: ModelRunner, seqs: list[Sequence], kv: KVCacheManager, chunk: int | None = None) -> None:
    """One forward for all unfinished seqs (each prefills up to `chunk` tokens, or decodes one)."""
    scheduled = []
    for s in seqs:
        if s.is_finished:
            continue
        n = len(s) - s.num_computed_tokens
        n = min(n, chunk) if chunk else n
        if not kv.allocate_slots(s, n):
            raise RuntimeError("KV cache too small for this batch: raise kv_cache_memory or lower the batch size")
        scheduled.append((s, n))
    for (s, n), token in zip(scheduled, runner.execute(scheduled).tokens):
        s.num_computed_tokens += n
        if token is not None:
            s.append_token(token, runner.eos_token_ids, runner.max_model_len)
            if s.is_finished:
                kv.free(s)


def generate(runner: ModelRunner, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             on_step: Callable[[list[Sequence]], None] | None = None,
             kv: KVCacheManager | None = None, chunk: int | None = None) -> list[Sequence]:
    """Runs prompts (token ids) to completion together; returns their finished Sequences in order. `chunk`:
    prefill at most this many tokens of each prompt a step (default: whole prompts in the first step)."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    kv = kv or kv_manager(runner)
    for p, prompt in zip(plist, prompts):
        p.validate()
        runner.check_prompt(prompt)
        kv.check_fits(len(prompt))
    seqs = [Sequence(prompt, p) for prompt, p in zip(prompts, plist)]
    try:
        while not all(s.is_finished for s in seqs):
            step(runner, seqs, kv, chunk)
            if on_step:
                on_step(seqs)
    finally:  # an exception mid-batch must not strand blocks
        for s in seqs:
            kv.free(s)
    return seqs


def score(runner: ModelRunner, token_ids: list[int], kv: KVCacheManager | None = None) -> torch.Tensor:
    """Float32 logits [n, vocab] at every position of a prompt (reference checks), through the paged path."""
    runner.check_prompt(token_ids)
    kv = kv or kv_manager(runner)
    kv.check_fits(len(token_ids))
    seq = Sequence(token_ids, SamplingParams())
    if not kv.allocate_slots(seq, len(token_ids)):
        raise InvalidRequestError("not enough free KV blocks to score this prompt now")
    try:
        return runner.score(seq)
    finally:
        kv.free(seq)
