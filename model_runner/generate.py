"""The simplest complete use of the runner: run a set of prompts together to the end (a static batch).

The serving engine lives in `batcher/`; this loop is for the one-shot CLI, the micro-benchmark and tests.
Each step feeds every unfinished sequence its next tokens (whole prompt first, then one token), and a
sequence that finishes gives its KV blocks back at once.
"""
from __future__ import annotations

from collections.abc import Callable

from .runner import ModelRunner
from .sampling_params import SamplingParams
from .sequence import Sequence


def step(runner: ModelRunner, seqs: list[Sequence], chunk: int | None = None) -> None:
    """One forward for all unfinished seqs (each prefills up to `chunk` tokens, or decodes one)."""
    alloc = runner.block_allocator
    scheduled = []
    for s in seqs:
        if s.is_finished:
            continue
        n = len(s) - s.num_computed_tokens
        n = min(n, chunk) if chunk else n
        if not alloc.grow(s.block_table, s.num_computed_tokens + n):
            raise RuntimeError("KV cache too small for this batch: raise kv_cache_memory or lower the batch size")
        scheduled.append((s, n))
    for (s, n), token in zip(scheduled, runner.execute(scheduled)):
        s.num_computed_tokens += n
        if token is not None:
            s.append_token(token, runner.eos_token_ids, runner.max_model_len)
            if s.is_finished:
                alloc.free(s.block_table)


def generate(runner: ModelRunner, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             on_step: Callable[[list[Sequence]], None] | None = None) -> list[Sequence]:
    """Runs prompts (token ids) to completion together; returns their finished Sequences in order."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for p, prompt in zip(plist, prompts):
        p.validate()
        runner.check_prompt(prompt)
    seqs = [Sequence(prompt, p) for prompt, p in zip(prompts, plist)]
    try:
        while not all(s.is_finished for s in seqs):
            step(runner, seqs)
            if on_step:
                on_step(seqs)
    finally:  # an exception mid-batch must not strand blocks
        for s in seqs:
            runner.block_allocator.free(s.block_table)
    return seqs
