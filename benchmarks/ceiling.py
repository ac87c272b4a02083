"""The ceiling on a trace's throughput for any batching policy on this engine and machine, measured.

    python -m benchmarks.ceiling [jitney bench's workload, model and knob flags] [--compare static=704]

However requests are scheduled, every prompt token must be prefilled and every output token but the first
decoded. This command times the engine's cheapest way to do each on the trace's own lengths: decode steps at
the batch sizes the continuous policy may run (powers of two up to max_num_seqs, and max_num_seqs itself, at
context lengths drawn from the trace's decode tokens) and prefill steps of max_num_batched_tokens tokens made
of the trace's prompts.

Two bounds follow. The work bound takes every decode token at the cheapest per-token cost measured (the
largest batch) and every prompt token at the prefill cost. The chain bound adds what no schedule escapes: a
request's output tokens are decoded one per step, in order, after its prompt, so the run takes at least as
many steps as its longest request needs (and as its tokens fill at max_num_batched_tokens and max_num_seqs a
step), and every step pays the weights' read whatever it holds. Its step cost is a fixed part plus a part per
decode row and per prompt token: the line under every measured decode step that makes the run cost the most
(a step cost that grows concavely with the batch lies on or above that line at every batch up to the largest
measured), the prompt token's part being the prefill step's time less the fixed part. The ceiling is the lower
of the two. Mixing prefill and decode in one step is taken as free beyond that fixed part, so this is an upper
estimate of throughput, not a proof. `--compare static=704` states a measured policy's figure as a fraction of
the ceiling: how much better any schedule could do than that policy.
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

DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, float]]:
    paragraphs = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="\n\n".join(paragraphs[:1] + paragraphs[2:]))  # all but the usage line
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


def min_steps(trace: list[TraceRequest], budget: int, max_seqs: int) -> int:
    """The fewest steps any schedule of the trace can take: a request's prompt takes at least
    ceil(prompt / budget) steps and then each output token after the first one step more, in order; a step
    holds at most `budget` tokens and max_seqs decodes."""
    decodes = sum(r.output_tokens - 1 for r in trace)
    chain = max(-(-r.prompt_tokens // budget) + r.output_tokens - 1 for r in trace)
    return max(chain, -(-(sum(r.prompt_tokens for r in trace) + decodes) // budget), -(-decodes // max_seqs))


def fixed_and_per_row(steps_s: dict[int, float], steps: int, rows: int) -> tuple[float, float]:
    """(seconds every step pays, seconds per decode row): the line through or under every measured decode step
    (batch: seconds) that makes `steps` steps of `rows` decodes in all cost the most. Under a step cost that
    grows concavely with the batch (a fixed part, the weights' read, and a part per row that falls as rows
    share it) the measured points lie on or above their chords, and so does the line: a lower bound at every
    batch up to the largest measured. The best line passes through two points, or one with a zero part."""
    points = sorted(steps_s.items())
    cands = [(0.0, min(s / b for b, s in points)), (min(s for _, s in points), 0.0)]
    cands += [(s1 - (s2 - s1) / (b2 - b1) * b1, (s2 - s1) / (b2 - b1))
              for i, (b1, s1) in enumerate(points) for b2, s2 in points[i + 1:]]
    under = [(f, r) for f, r in cands if f >= 0 and r >= 0 and all(f + r * b <= s * (1 + 1e-12) for b, s in points)]
    return max(under, key=lambda fr: fr[0] * steps + fr[1] * rows)


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
    cfg = cfg.for_runner(runner)
    print(f"machine: {cpu_model()}\n{runner.describe()}\nstep budget: {cfg.max_num_batched_tokens} tokens")
    rng, meter = random.Random(args.seed), NeighbourMeter()

    decode = {}
    # Up to max_num_seqs itself: the fitted line is a bound only up to the largest batch measured.
    batches = {b for b in DECODE_BATCHES if b <= cfg.max_num_seqs} | {min(cfg.max_num_seqs, DECODE_BATCHES[-1])}
    for b in sorted(batches):
        contexts = decode_contexts(trace, b, rng)
        step_seconds(runner, contexts, [1] * b, 1)  # warm-up: oneDNN picks kernels for a new shape
        decode[b] = step_seconds(runner, contexts, [1] * b, args.steps) / b
    prompts = prefill_prompts(trace, cfg.max_num_batched_tokens, rng)
    step_seconds(runner, prompts, prompts, 1)
    prefill = step_seconds(runner, prompts, prompts, args.steps) / sum(prompts)

    best_batch = min(decode, key=decode.get)
    prompt_tokens = sum(r.prompt_tokens for r in trace)
    output_tokens = sum(r.output_tokens for r in trace)
    decodes = output_tokens - len(trace)
    work = decodes * decode[best_batch] + prompt_tokens * prefill
    # The chain bound: each step pays the fixed part once, whatever it holds; a prompt token costs the prefill
    # step's time less that fixed part, spread over its tokens.
    steps = min_steps(trace, cfg.max_num_batched_tokens, cfg.max_num_seqs)
    fixed, per_row = fixed_and_per_row({b: s * b for b, s in decode.items()}, steps, decodes)
    per_prompt_token = max(0.0, prefill - fixed / sum(prompts))
    busy = steps * fixed + decodes * per_row + prompt_tokens * per_prompt_token
    ceiling = output_tokens / max(busy, work)  # the larger busy time: both are lower bounds
    print("\n| decode batch | ms per token | tokens/s |\n|---|---|---|")
    for b, s in decode.items():
        print(f"| {b} | {1000 * s:.2f} | {1 / s:,.0f} |")
    print(f"\nprefill, {len(prompts)} prompts of the trace in one {sum(prompts)}-token step: "
          f"{1000 * prefill:.3f} ms per token ({1 / prefill:,.0f} tokens/s)")
    print(f"trace: {len(trace)} requests, {prompt_tokens:,} prompt tokens, {output_tokens:,} output tokens")
    print(f"work bound: {work:.1f} s busy (every decode at batch {best_batch}'s cost) -> "
          f"{output_tokens / work:,.0f} output tokens/s")
    print(f"chain bound: {busy:.1f} s busy (at least {steps} steps, {1000 * fixed:.1f} ms each plus "
          f"{1000 * per_row:.2f} ms a decode row and {1000 * per_prompt_token:.3f} ms a prompt token) -> "
          f"{output_tokens / busy:,.0f} output tokens/s")
    print(f"ceiling for any schedule: {ceiling:,.0f} output tokens/s (the lower of the two)")
    for name, tok_s in compare.items():
        print(f"{name}: {tok_s:,.0f} output tok/s measured, {100 * tok_s / ceiling:.1f} % of the ceiling "
              f"({100 * tok_s * work / output_tokens:.1f} % of the work bound)")
    print(f"other processes used {100 * meter.share():.0f}% of the CPUs meanwhile")
    report = dict(args=vars(args), decode_s_per_token=decode, prefill_s_per_token=prefill, best_batch=best_batch,
                  prompt_tokens=prompt_tokens, output_tokens=output_tokens, work_bound_s=work,
                  work_bound_tok_s=output_tokens / work, min_steps=steps, fixed_s=fixed, per_row_s=per_row,
                  per_prompt_token_s=per_prompt_token, chain_bound_s=busy, busy_s=max(busy, work),
                  ceiling_tok_s=ceiling,
                  compare={k: dict(tok_s=v, ceiling_ratio=ceiling / v, of_ceiling=v / ceiling)
                           for k, v in compare.items()})
    return finish(report, args.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
