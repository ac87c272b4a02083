"""What a long-lived server's KV block layout costs its decode steps, measured.

    python -m benchmarks.kv_layout [jitney bench's workload and model flags] [--rounds 4]

A server's free list starts in order and ends, after hours, in the order sequences released their blocks, so
where a new sequence's blocks lie depends on what ran before it. This command replays the trace --rounds times
through one engine, each round with prompts of its own (no prefix-cache hits), so each starts from the free
list the previous one left. It reports each round's output tok/s and how the block tables its decode steps read
run: the share of adjacent block pairs that go forward (b, b + 1) and backward (b, b - 1). Then it takes
--samples of the last round's decode-only steps and times each in isolation, alternately, --reps times: as laid
out, and with each sequence's blocks packed into one ascending run (the same contexts). The ratio of the two
sums is what the layout costs a decode step; batcher/kv_cache_manager.py's claims are what keep it near 1.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from batcher.engine import Engine
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence
from model_runner.threads import torch_thread

from .bench import add_model_args, add_workload_args, resolve
from .machine import cpu_model
from .replay import BATCHER_KNOBS, batcher_config, prompt_ids, replay
from .report import finish
from .targets import runner_config
from .workloads import WORKLOADS

Layout = list[tuple[list[int], int]]  # one decode step: each sequence's block table and context length


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_layout", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_workload_args(p)
    p.add_argument("--rounds", type=int, default=4, help="replays of the trace through one engine (default: 4)")
    p.add_argument("--samples", type=int, default=20, help="decode steps of the last round timed (default: 20)")
    p.add_argument("--reps", type=int, default=4, help="timings of each step and layout; the median is kept")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = resolve(p, p.parse_args(argv))
    if args.rounds < 1 or args.samples < 1 or args.reps < 2:
        p.error("--rounds and --samples take at least 1, --reps at least 2 (the first is a warm-up)")
    return args


def run_pairs(layouts: list[Layout]) -> tuple[int, int, int]:
    """(pairs of consecutive table entries, of them forward (b, b + 1), backward (b, b - 1)) over these steps."""
    pairs = forward = backward = 0
    for step in layouts:
        for table, _ in step:
            for a, b in zip(table, table[1:]):
                pairs, forward, backward = pairs + 1, forward + (b == a + 1), backward + (b == a - 1)
    return pairs, forward, backward


async def replay_rounds(engine: Engine, args, trace) -> tuple[list[dict], list[Layout]]:
    """Each round's figures, and the decode-only steps (layouts) of the last round."""
    rounds, layouts = [], []

    def watch(_engine, plan, _tokens, _t0, _elapsed) -> None:
        if all(n == 1 for _, n in plan.scheduled):
            layouts.append([(list(s.block_table), s.num_computed_tokens) for s, _ in plan.scheduled])

    engine.counters.step_watchers.append(watch)
    for i in range(args.rounds):
        layouts.clear()
        ids = prompt_ids(engine.tokenizer, trace, f"{args.seed}:layout:{i}", args.shared_prefix)
        t0 = time.perf_counter()
        records = await replay(engine, trace, engine.tokenizer, progress=not args.no_progress, desc=f"round {i}",
                               ids=ids)
        seconds = time.perf_counter() - t0
        pairs, forward, backward = run_pairs(layouts)
        rounds.append(dict(round=i, output_tok_s=sum(r.output_tokens for r in records) / seconds,
                           forward=forward / max(pairs, 1), backward=backward / max(pairs, 1)))
        r = rounds[-1]
        print(f"round {i}: {r['output_tok_s']:.0f} output tok/s; consecutive block pairs read: forward "
              f"{r['forward']:.0%}, backward {r['backward']:.0%}", flush=True)
    engine.counters.step_watchers.remove(watch)
    return rounds, layouts


def packed(step: Layout) -> Layout:
    """The same contexts, each sequence's blocks one ascending run after the previous sequence's."""
    out, start = [], 0
    for table, ctx in step:
        out.append((list(range(start, start + len(table))), ctx))
        start += len(table)
    return out


def step_ms(runner: ModelRunner, step: Layout) -> float:
    """One decode step over these tables (whatever the blocks hold: attention reads it all the same)."""
    plan = []
    for table, ctx in step:
        s = Sequence([5] * (ctx + 1), SamplingParams(max_tokens=1, ignore_eos=True))
        s.block_table, s.num_computed_tokens = table, ctx
        plan.append((s, 1))
    t0 = time.perf_counter()
    runner.execute(plan)
    return 1e3 * (time.perf_counter() - t0)


def time_layouts(runner: ModelRunner, steps: list[Layout], reps: int) -> list[dict]:
    rows = []
    for step in steps:
        times = {"as laid out": [], "packed": []}
        for _ in range(reps):  # alternated, so drift falls on both alike
            for name, layout in (("as laid out", step), ("packed", packed(step))):
                times[name].append(step_ms(runner, layout))
        rows.append(dict(batch=len(step), **{k: statistics.median(v[1:]) for k, v in times.items()}))
        print(f"| {len(step)} | {rows[-1]['as laid out']:.1f} | {rows[-1]['packed']:.1f} | "
              f"{rows[-1]['as laid out'] / rows[-1]['packed']:.2f}x |", flush=True)
    return rows


async def measure(args, trace) -> dict:
    runner = ModelRunner(runner_config(args, block_size=args.block_size or 16), progress=not args.no_progress)
    print(f"machine: {cpu_model()}\n{runner.describe()}")
    cfg = batcher_config("continuous", {k: getattr(args, k) for k in BATCHER_KNOBS},
                         enable_prefix_caching=not args.no_prefix_caching)
    engine = Engine(runner, cfg)
    await engine.start()
    try:
        rounds, layouts = await replay_rounds(engine, args, trace)
    finally:
        await engine.stop()
    every = max(1, len(layouts) // args.samples)
    sample = layouts[::every][:args.samples]
    print(f"\n{len(sample)} decode steps of round {args.rounds - 1}, timed alone:\n\n"
          "| batch | as laid out, ms | packed, ms | ratio |\n|---|---|---|---|")
    rows = await asyncio.get_running_loop().run_in_executor(torch_thread(), time_layouts, runner, sample, args.reps)
    ratio = sum(r["as laid out"] for r in rows) / max(sum(r["packed"] for r in rows), 1e-9)
    print(f"\nthe layout costs these steps {ratio:.3f}x the packed time")
    return dict(machine=cpu_model(), rounds=rounds, steps=rows, layout_cost=ratio)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    trace, _ = WORKLOADS[args.workload].build(args)
    return finish(asyncio.run(measure(args, trace)), args.json, started)


if __name__ == "__main__":
    main()
