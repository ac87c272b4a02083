"""Engine benchmark: one trace replayed open-loop through each batching policy in turn, on one loaded model.

    python -m benchmarks.engine_bench [--workload poisson|burst] [--policies sequential,static,dynamic,continuous]
        [--num-requests N] [--rate R] [--prompt-len LO,HI] [--output-len LO,HI] [--shared-prefix N]
        [--trace in.jsonl] [--save-trace out.jsonl]
        [--model M] [--dtype D] [--max-batch-size B] [--max-num-seqs S] [--max-num-batched-tokens T]
        [--max-wait-ms W] [--static-flush-ms F] [--kv-cache-gib G] [--no-prefix-caching] [--seed S]
        [--json out.json] [--quick]

All policies share the model, the sampler and the KV cache, so the table compares scheduling alone.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import asdict

import torch

from batcher.config import POLICIES, BatcherConfig
from batcher.engine import Engine, StepRecord
from model_runner.config import RunnerConfig
from model_runner.kv_cache import BlockAllocator
from model_runner.loader import DEFAULT_MODEL
from model_runner.runner import ModelRunner

from .machine import cpu_model
from .replay import BATCHER_KNOBS, RequestRecord, replay
from .replay import batcher_config as replay_batcher_config
from .report import finish, markdown_table, ratio_table, summarize, wall_seconds
from .trace import TraceRequest, burst, load_trace, lo_hi, poisson, save_trace

# Per-workload defaults. The Poisson rate offers ~2,200 prompt and ~2,200 output tok/s: more than continuous
# batching serves with the default model on 2 cores (the machine is saturated, as the comparison asks),
# many times what sequential or run-to-completion batches can, so every policy's queue grows for the whole trace.
WORKLOADS = {
    "poisson": dict(num_requests=200, rate=16.0, prompt_len=(16, 256), output_len=(8, 256)),
    "burst": dict(num_requests=128, rate=None, prompt_len=(32, 512), output_len=(16, 256)),
}
QUICK = dict(num_requests=8, rate=50.0, prompt_len=(4, 32), output_len=(4, 16))
# The published comparison point for the burst preset: same workload, same machine, vLLM's in-process engine.
VLLM_BURST = dict(workload="burst", num_requests=128, prompt_len=(32, 512), output_len=(16, 256))
VLLM_BURST_TOK_S = 540.0


def parse_args(argv: list[str] | None, p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The trace, model and batcher flags, with the workload's preset for those not given; `p` may bring a
    command's own flags (benchmarks.ceiling)."""
    p = p or argparse.ArgumentParser(prog="python -m benchmarks.engine_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="poisson")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--rate", type=float, help="poisson: mean arrivals per second")
    p.add_argument("--prompt-len", type=lo_hi, help="LO,HI prompt tokens (uniform)")
    p.add_argument("--output-len", type=lo_hi, help="LO,HI output tokens (uniform, forced with ignore_eos)")
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with (prefix cache)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off (to compare)")
    p.add_argument("--trace", help="replay this JSONL trace instead of generating one")
    p.add_argument("--save-trace", help="write the trace replayed to this JSONL file")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--static-flush-ms", type=float)
    p.add_argument("--kv-cache-gib", type=float, help="KV cache budget (default: the runner's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the trace, every record, step log and summary to this file")
    p.add_argument("--quick", action="store_true", help="8 short requests, batches of 4 (a smoke run)")
    args = p.parse_args(argv)
    preset = dict(WORKLOADS[args.workload], **(QUICK if args.quick else {}))
    for k, v in preset.items():  # flags given win over the preset
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.max_batch_size = args.max_batch_size or 4  # full static batches, so no flush timeout is waited out
        args.kv_cache_gib = args.kv_cache_gib or 1 / 16
    args.policies = args.policies.split(",")
    if unknown := set(args.policies) - set(POLICIES):
        p.error(f"unknown policies {sorted(unknown)}: choose from {', '.join(POLICIES)}")
    return args


def make_trace(args: argparse.Namespace) -> list[TraceRequest]:
    if args.trace:
        return load_trace(args.trace)
    if args.workload == "burst":
        return burst(args.num_requests, args.prompt_len, args.output_len, args.seed)
    return poisson(args.num_requests, args.rate, args.prompt_len, args.output_len, args.seed)


def batcher_config(args: argparse.Namespace, policy: str) -> BatcherConfig:
    return replay_batcher_config(policy, {k: getattr(args, k) for k in BATCHER_KNOBS},
                                 enable_prefix_caching=not args.no_prefix_caching)


# --- running -------------------------------------------------------------------------------------------------

async def run_policy(runner: ModelRunner, cfg: BatcherConfig, trace: list[TraceRequest], seed: int,
                     progress: bool = True, shared_prefix: int = 0) -> tuple[list[RequestRecord], list[StepRecord]]:
    # A fresh allocator: the previous policy served the very same prompts, and its prefix cache would hand this
    # one their KV for free.
    runner.block_allocator = BlockAllocator(runner.num_blocks, runner.block_size)
    engine = Engine(runner, cfg, record_steps=True)
    await engine.start()
    try:
        records = await replay(engine, trace, runner.tokenizer, seed, progress, cfg.policy, shared_prefix)
    finally:
        await engine.stop()
    return records, engine.step_log


async def warm_up(runner: ModelRunner, args: argparse.Namespace) -> None:
    """A few untimed requests, so the first policy does not pay for oneDNN picking kernels for new shapes."""
    trace = burst(4, (args.prompt_len[1],) * 2, (8, 8), seed=-1)
    await run_policy(runner, batcher_config(args, "continuous"), trace, seed=-1, progress=False)


async def run_all(runner: ModelRunner, trace: list[TraceRequest], args: argparse.Namespace) -> dict[str, dict]:
    await warm_up(runner, args)
    results = {}
    for policy in args.policies:
        records, steps = await run_policy(runner, batcher_config(args, policy), trace, args.seed,
                                          shared_prefix=args.shared_prefix)
        results[policy] = dict(summary=summarize(records, wall_seconds(records), steps),
                               records=[asdict(r) for r in records], steps=[asdict(s) for s in steps])
    return results


# --- report --------------------------------------------------------------------------------------------------

def format_header(args: argparse.Namespace, runner: ModelRunner, trace: list[TraceRequest], load: float) -> str:
    if args.trace:
        workload = f"trace {args.trace}: {len(trace)} requests"
    else:
        arrivals = "all at t=0" if args.workload == "burst" else f"Poisson arrivals at {args.rate:g} req/s"
        (p_lo, p_hi), (o_lo, o_hi) = args.prompt_len, args.output_len
        workload = (f"{args.workload}: {len(trace)} requests, {arrivals}, prompts {p_lo}..{p_hi} tokens, "
                    f"outputs {o_lo}..{o_hi} tokens (uniform, forced, greedy)")
    if args.shared_prefix:
        workload += f", {args.shared_prefix}-token shared prefix"
    workload += ", prefix caching " + ("off" if args.no_prefix_caching else "on")
    cfg = batcher_config(args, "continuous")
    knobs = ", ".join(f"{k}={getattr(cfg, k):g}" for k in BATCHER_KNOBS)
    # Other processes on these few cores slow every figure: the load average says how quiet the machine was.
    return (f"# jitney engine benchmark\n\nmachine: {cpu_model()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}; load average at start {load:.2f}\n{runner.describe()}\nworkload: {workload}; "
            f"seed {args.seed}\nbatcher: {knobs}; open-loop replay, in-process")


def vllm_reference(args: argparse.Namespace, summaries: dict[str, dict]) -> str | None:
    """vLLM's figure beside ours, only when the workload is the one it was measured on."""
    if args.trace or args.quick or "continuous" not in summaries:
        return None
    if any(getattr(args, k) != v for k, v in VLLM_BURST.items()):
        return None
    ours = summaries["continuous"]["output_tok_s"]
    return (f"reference: vLLM (CPU, in-process, this machine) serves this burst at ~{VLLM_BURST_TOK_S:.0f} output "
            f"tok/s; jitney continuous {ours:,.0f} tok/s ({ours / VLLM_BURST_TOK_S:.2f}x)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0, load = time.perf_counter(), os.getloadavg()[0]
    trace = make_trace(args)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    kv = None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30)
    runner = ModelRunner(RunnerConfig(model=args.model, dtype=args.dtype, kv_cache_memory=kv), progress=True)
    results = asyncio.run(run_all(runner, trace, args))
    summaries = {p: r["summary"] for p, r in results.items()}
    print(format_header(args, runner, trace, load) + "\n\n" + markdown_table(summaries))
    if "continuous" in summaries and len(summaries) > 1:
        print("\n" + ratio_table(summaries))
    if ref := vllm_reference(args, summaries):
        print("\n" + ref)
    report = dict(args=vars(args), load_average=load, runner=runner.describe(),
                  batcher={p: asdict(batcher_config(args, p)) for p in args.policies},
                  trace=[asdict(r) for r in trace], policies=results)
    return finish(report, args.json, t0)


if __name__ == "__main__":
    main()
