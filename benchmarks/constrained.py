"""What constrained decoding (response_format) and parallel sampling (n > 1) cost, on the real model.

    python -m benchmarks.constrained [--model smollm2-135m] [--batch-sizes 1,16] [--steps 48] [--n 4]

1. Compile: a fresh compiler's first schema (it builds llguidance's view of the vocabulary), a second schema,
   and a cache hit; then large (~30 KiB) schemas under llguidance's default limits and under ours
   (grammar.COMPILE_LIMITS), each compiled or refused.
2. Per token: decode steps of B sequences with and without a grammar (the same prompts, the same number of
   steps: the schema is long enough that no sequence ends), and the mask alone (fill + apply) per step.
3. n: one request of n samples against n = 1 (tokens per second, peak KV blocks): the samples share the
   prompt's full blocks.
Docs: docs/constrained-decoding.md. Run it under the exclusive CPU lock, nothing else running.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.generate import kv_manager
from model_runner.config import RunnerConfig
from model_runner.grammar import GrammarCompiler, GrammarError, apply_grammar_masks
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

from .machine import cpu_model

# A typical response schema (an object of named, typed fields), and one long enough that no sequence finishes
# inside the timed steps (40 strings of 8..20 characters), so every step keeps the whole batch.
TYPICAL = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email", "tags", "address"],
           "properties": {"name": {"type": "string", "maxLength": 60}, "age": {"type": "integer", "minimum": 0},
                          "email": {"type": "string", "format": "email"},
                          "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
                          "address": {"type": "object", "required": ["city", "zip"], "properties": {
                              "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
LONG = {"type": "object", "additionalProperties": False, "required": ["cities"], "properties": {"cities": {
    "type": "array", "minItems": 40, "maxItems": 40,
    "items": {"type": "string", "minLength": 8, "maxLength": 20}}}}
QUESTION = "List forty cities of Europe as JSON."
REPEATS = 3


def variant(i: int) -> dict:
    """TYPICAL with one bound changed: a new grammar (a changed "title" or "description" is a cache hit)."""
    return {**TYPICAL, "properties": {**TYPICAL["properties"], "name": {"type": "string", "maxLength": 61 + i}}}


def _fields(n: int, field) -> dict:
    names = [f"p{i}" for i in range(n)]
    return {"type": "object", "properties": {name: field(i) for i, name in enumerate(names)}, "required": names}


# Large schemas (within the API's 32 KiB but the last) that stress llguidance's compile in different ways.
LARGE = {
    "300 bounded strings": _fields(300, lambda i: {"type": "string", "minLength": 50, "maxLength": 1000 + i}),
    "200 patterns": _fields(200, lambda i: {"type": "string", "pattern": f"^[a-z]{{{i + 1},{i + 200}}}[0-9]{{3}}$"}),
    "400 integer ranges": _fields(400, lambda i: {"type": "integer", "minimum": -123456789 * i,
                                                  "maximum": 987654321 * i + 7}),
    "400 number ranges": _fields(400, lambda i: {"type": "number", "minimum": -1234.5678 * i,
                                                 "maximum": 9876.54321 * i + 0.7}),
    "100 arrays of 100-1000 bounded integers": _fields(100, lambda i: {"type": "array", "minItems": 100,
        "maxItems": 1000, "items": {"type": "integer", "minimum": 0, "maximum": 999}}),
    "a 40-way anyOf of 20-field objects (37 KiB)": {"anyOf": [_fields(20, lambda i, j=j: {
        "type": "string", "maxLength": 500 + j}) for j in range(40)]},
}


def compile_limits(runner: ModelRunner) -> None:
    """Each LARGE schema compiled by a fresh compiler (vocabulary built first) under llguidance's default limits
    and under ours: the time, and whether it compiled or was refused."""
    for name, limits in (("llguidance's defaults", {}), ("ours (COMPILE_LIMITS)", None)):
        c = GrammarCompiler(runner.tokenizer, runner.model_config.vocab_size, runner.eos_token_ids, limits=limits)
        c.prepare()
        print(f"  {name}:")
        for what, schema in LARGE.items():
            t0 = time.perf_counter()
            try:
                c.json_schema(schema)
                outcome = "compiled"
            except GrammarError as e:
                outcome = f"refused ({str(e)[:50]})"
            print(f"    {what:45s} {1000 * (time.perf_counter() - t0):8.0f} ms  {outcome}")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compile_times(runner: ModelRunner) -> dict:
    fresh = GrammarCompiler(runner.tokenizer, runner.model_config.vocab_size, runner.eos_token_ids)
    first, _ = timed(lambda: fresh.json_schema(TYPICAL))
    second, _ = timed(lambda: fresh.json_schema(LONG))
    hit, _ = timed(lambda: fresh.cached(fresh.key(TYPICAL)))
    again = min(timed(lambda: fresh.json_schema(variant(i)))[0] for i in range(5))
    return {"first schema (incl. the vocabulary, once per server)": first, "a new schema": again,
            "another new schema (LONG)": second, "cache hit": hit}


async def loop_stall(work) -> tuple[float, float]:
    """(seconds, the longest gap of a 1 ms ticker on the event loop) while `work` runs in a worker thread, as
    the API runs a compile: how long the loop is held up (the GIL)."""
    gaps, done = [], False

    async def tick():
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    t0 = time.perf_counter()
    await asyncio.to_thread(work)
    seconds = time.perf_counter() - t0
    done = True
    await ticker
    return seconds, max(gaps)


def prompt_ids(runner: ModelRunner) -> list[int]:
    return runner.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]


def decode_steps(runner: ModelRunner, batch: int, steps: int, grammar) -> tuple[list[float], list[float]]:
    """(seconds of each decode step, seconds of the mask alone at each step) for `batch` sequences.
    A step is the runner's execute plus appending the tokens (where each matcher consumes its token)."""
    ids = prompt_ids(runner)
    params = SamplingParams(max_tokens=steps + 3, temperature=0.8, seed=0, grammar=grammar,
                            ignore_eos=grammar is None)
    seqs = [Sequence(ids, params) for _ in range(batch)]
    kv = kv_manager(runner)
    step_s, mask_s = [], []
    logits = torch.zeros(batch, runner.model_config.vocab_size)
    try:
        for k in range(steps + 2):
            scheduled = []
            for s in seqs:
                n = len(s) - s.num_computed_tokens
                assert kv.allocate_slots(s, n)
                scheduled.append((s, n))
            t0 = time.perf_counter()
            tokens = runner.execute(scheduled).tokens
            for (s, n), t in zip(scheduled, tokens):  # the scheduler's part: the matcher consumes each token here
                s.num_computed_tokens += n
                s.append_token(t, runner.eos_token_ids, runner.max_model_len)
                assert not s.is_finished, "a sequence ended inside the timed steps"
            if k >= 2:  # the prefill, and the first decode (kernel selection), are not timed
                step_s.append(time.perf_counter() - t0)
                if grammar is not None:
                    mask_s.append(timed(lambda: apply_grammar_masks(logits, [s.matcher for s in seqs],
                                                                    runner.grammars.mask_words))[0])
    finally:
        for s in seqs:
            kv.free(s)
    return step_s, mask_s


async def parallel(runner: ModelRunner, n: int, max_tokens: int) -> dict:
    """One request of n samples: wall seconds, output tokens per second, the peak of KV blocks in use."""
    engine = Engine(runner, BatcherConfig(max_num_seqs=max(n, 1)))
    peak = 0

    def observe(rec):
        nonlocal peak
        peak = max(peak, rec.kv_blocks_used)

    engine.step_observers.append(observe)
    await engine.start()
    ids = runner.tokenizer(QUESTION * 40, add_special_tokens=False)["input_ids"][:512]
    try:
        t0 = time.perf_counter()
        streams = await engine.add_parallel_requests(
            ids, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=1, ignore_eos=True), n)
        tokens = 0
        for s in streams:
            async for out in s:
                tokens += len(out.token_ids)
        wall = time.perf_counter() - t0
    finally:
        await engine.stop()
    return {"n": n, "prompt tokens": len(ids), "output tokens": tokens, "seconds": wall,
            "tokens/s": tokens / wall, "peak KV blocks": peak, "block size": runner.block_size}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--n", type=int, default=4)
    args = p.parse_args(argv)
    runner = ModelRunner(RunnerConfig(model=args.model), progress=False)
    print(f"CPU: {cpu_model()}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}; "
          f"{runner.describe()}")
    print("\n## grammar compile (ms)")
    for what, s in compile_times(runner).items():
        print(f"  {what:55s} {1000 * s:8.2f}")
    compile_limits(runner)
    fresh = GrammarCompiler(runner.tokenizer, runner.model_config.vocab_size, runner.eos_token_ids)
    print("  the event loop while a worker thread works (the longest gap of a 1 ms ticker):")
    for what, work in (("building the vocabulary (the server does it at start-up)", fresh.prepare),
                       ("compiling a new schema", lambda: fresh.json_schema(variant(99)))):
        seconds, gap = asyncio.run(loop_stall(work))
        print(f"    {what}: {1000 * seconds:.1f} ms of work, longest gap {1000 * gap:.1f} ms")
    grammar = runner.grammars.json_schema(LONG)
    print(f"\n## decode step: median ms of {REPEATS} x {args.steps} timed steps, with and without a grammar "
          "taking turns, temperature 0.8")
    print("  batch   unconstrained   constrained   mask alone   overhead per token")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        plain_s, cons_s, mask_s = [], [], []
        for _ in range(REPEATS):  # in turns, so a slow spell of the machine falls on both
            plain_s += decode_steps(runner, b, args.steps, None)[0]
            steps, masks = decode_steps(runner, b, args.steps, grammar)
            cons_s += steps
            mask_s += masks
        plain, cons, mask = (statistics.median(x) for x in (plain_s, cons_s, mask_s))
        print(f"  {b:5d}   {1000 * plain:13.2f}   {1000 * cons:11.2f}   {1000 * mask:10.3f}   "
              f"{100 * (cons - plain) / plain:+6.1f}% ({1000 * (cons - plain) / b:+.3f} ms/token)")
    print("\n## parallel sampling: one request, n samples, 64 tokens each")
    asyncio.run(parallel(runner, args.n, 8))  # warm-up: the engine's first prefill and decode shapes
    runs = [asyncio.run(parallel(runner, n, 64)) for n in (1, args.n)]
    for r in runs:
        print("  " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    print(f"  n = {args.n} holds {runs[1]['peak KV blocks']} blocks at its peak; {args.n} separate requests would "
          f"hold {args.n * runs[0]['peak KV blocks']}; tokens/s x{runs[1]['tokens/s'] / runs[0]['tokens/s']:.2f}")


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
