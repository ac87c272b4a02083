"""The ceiling on a trace's throughput for any batching policy on this engine and machine, measured.

    python -m benchmarks.ceiling [jitney bench's workload, model and knob flags] [--compare static=704]

However requests are scheduled, every prompt token must be prefilled and every output token but the first
decoded. This command times the engine's cheapest way to do each on the trace's own lengths: decode steps at
the batch sizes the continuous policy may run (up to max_num_seqs, at context lengths drawn from the trace's
decode tokens) and prefill steps of max_num_batched_tokens tokens made of the trace's prompts. Each token at
its cheapest cost gives the least busy time the trace needs, and so the most output tokens per second any
scheduler can reach (mixing prefill and decode in one step saves little once both are compute-bound, so
this is an upper estimate, not a proof). `--compare static=704` states a measured policy's figure as a
fraction of it: how much better any schedule could do than that policy.
"""
from __future__ import annotations

import argparse
import random
import time

from model_runner.config import RunnerConfig
from model_runner.runner import ModelRunner

from .bench import add_model_args, add_workload_args, resolve
from .machine import NeighbourMeter, best_seconds, cpu_model
from .replay import BATCHER_KNOBS, batcher_config
from .report import finish
from .steps import held
from .targets import runner_config
from .trace import TraceRequest, save_trace
from .workloads import WORKLOADS

DECODE_BATCHES = (16, 32, 64, 128, 256)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="\n\n".join(__doc__.split("\n\n")[::2]))  # all but the usage line
    add_model_args(p)
    add_workload_args(p)
    p.add_argument("--compare", action="append", default=[], metavar="POLICY=TOK_S",
                   help="a measured policy's output tok/s, to state against the ceiling (repeatable)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per shape (the fastest is kept)")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    # What the ceiling does not depend on (no queue, no prefix cache, synthetic prompts of any content): refused
    # rather than ignored.
    if unread := [f for f in ("max_wait_ms", "static_flush_ms", "max_batch_size", "no_prefix_caching",
                              "shared_prefix") if getattr(args, f)]:
        p.error(f"the ceiling does not depend on --{', --'.join(unread).replace('_', '-')}")
    args = resolve(p, args)
    compare = {}
    for item in args.compare:
        name, _, value = item.partition("=")
        try:
            compare[name] = float(value)
        except ValueError:
            p.error(f"--compare wants POLICY=TOK_S, e.g. static=704; got {item!r}")
    return args, compare


def step_seconds(runner: ModelRunner, contexts: list[int], chunk: list[int], reps: int) -> float:
    """The fastest of `reps` steps that feed chunk[i] tokens to sequences of contexts[i] tokens."""
    with held(runner, contexts, chunk) as plan:
        return best_seconds(lambda: runner.execute(plan), reps)


def decode_contexts(trace: list[TraceRequest], k: int, rng: random.Random) -> list[int]:
    """k context lengths drawn from the trace's decode tokens (output token j of a request attends to
    prompt + j tokens), so attention costs what it costs on this trace."""
    tokens = [(r.prompt_tokens, r.output_tokens) for r in trace if r.output_tokens > 1]
    weights = [o - 1 for _, o in tokens]
    picks = rng.choices(tokens, weights, k=k)
    return [p + rng.randint(1, o - 1) for p, o in picks]


def prefill_prompts(trace: list[TraceRequest], budget: int, rng: random.Random) -> list[int]:
    """Prompt lengths drawn from the trace filling one step of `budget` tokens (the last one cut to fit)."""
    lengths, total = [], 0
    while total < budget:
        n = min(rng.choice(trace).prompt_tokens, budget - total)
        lengths.append(n)
        total += n
    return lengths


def main(argv: list[str] | None = None) -> dict:
    args, compare = parse_args(argv)
    started = time.perf_counter()
    trace, _ = WORKLOADS[args.workload].build(args)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    cfg = batcher_config("continuous", {k: getattr(args, k) for k in BATCHER_KNOBS})
    kv = args.kv_cache_memory or 4 << 30
    runner = ModelRunner(runner_config(args, kv_cache_memory=kv, block_size=args.block_size or RunnerConfig.block_size),
                         progress=True)
    print(f"machine: {cpu_model()}\n{runner.describe()}")
    rng, meter = random.Random(args.seed), NeighbourMeter()

    decode = {}
    for b in (b for b in DECODE_BATCHES if b <= cfg.max_num_seqs):
        contexts = decode_contexts(trace, b, rng)
        step_seconds(runner, contexts, [1] * b, 1)  # warm-up: oneDNN picks kernels for a new shape
        decode[b] = step_seconds(runner, contexts, [1] * b, args.steps) / b
    prompts = prefill_prompts(trace, cfg.max_num_batched_tokens, rng)
    step_seconds(runner, prompts, prompts, 1)
    prefill = step_seconds(runner, prompts, prompts, args.steps) / sum(prompts)

    best_batch = min(decode, key=decode.get)
    prompt_tokens = sum(r.prompt_tokens for r in trace)
    output_tokens = sum(r.output_tokens for r in trace)
    busy = (output_tokens - len(trace)) * decode[best_batch] + prompt_tokens * prefill
    ceiling = output_tokens / busy
    print("\n| decode batch | ms per token | tokens/s |\n|---|---|---|")
    for b, s in decode.items():
        print(f"| {b} | {1000 * s:.2f} | {1 / s:,.0f} |")
    print(f"\nprefill, {len(prompts)} prompts of the trace in one {sum(prompts)}-token step: "
          f"{1000 * prefill:.3f} ms per token ({1 / prefill:,.0f} tokens/s)")
    print(f"trace: {len(trace)} requests, {prompt_tokens:,} prompt tokens, {output_tokens:,} output tokens")
    print(f"least busy time: {busy:.1f} s (decode at batch {best_batch}, prefill as above) -> "
          f"ceiling {ceiling:,.0f} output tokens/s for any schedule")
    for name, tok_s in compare.items():
        print(f"{name}: {tok_s:,.0f} output tok/s measured; the ceiling is {ceiling / tok_s:.2f}x that")
    print(f"other processes used {100 * meter.share():.0f}% of the CPUs meanwhile")
    report = dict(args=vars(args), decode_s_per_token=decode, prefill_s_per_token=prefill, best_batch=best_batch,
                  prompt_tokens=prompt_tokens, output_tokens=output_tokens, busy_s=busy, ceiling_tok_s=ceiling,
                  compare={k: dict(tok_s=v, ceiling_ratio=ceiling / v) for k, v in compare.items()})
    return finish(report, args.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
