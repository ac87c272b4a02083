"""Sharing the machine: the decode step with a busy neighbour on one core, for each thread count and OpenMP wait
policy, against the same step on a quiet machine.

    .venv/bin/python -m benchmarks.contention [--model M] [--dtype auto] [--batch-sizes 1,2,8,32] [--steps 16]
                                              [--json out.json]

Why: a step splits its matmuls and attention over --threads threads and waits for the slowest at every barrier.
With a thread per core and another process busy on one core, that thread gets the core only in the scheduler's
slices, and with OpenMP's default wait policy the waiting threads spin while it does (libgomp spins before
sleeping), so one busy core can cost far more than half the machine. Each row runs in its own process (OpenMP
reads OMP_WAIT_POLICY once, at load); the neighbour is a process spinning on the last CPU of this one's mask.
The answer it gives is in docs/benchmarks.md#sharing-the-machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .machine import cpu_model
from .report import finish

CONFIGS = (  # (label, threads (0: every available CPU), OMP_WAIT_POLICY or None for libgomp's default, pinned)
    # pinned: the server runs under `taskset` on the CPUs the neighbour does not use, so its default thread
    # count (the affinity mask) drops to match.
    ("default: all CPUs, default wait", 0, None, False),
    ("all CPUs, OMP_WAIT_POLICY=passive", 0, "passive", False),
    ("--threads 1", 1, None, False),
    ("taskset to the other CPUs (threads follow the mask)", 0, None, True),
)


def child(args: argparse.Namespace) -> None:
    """One configuration: time the decode step at each batch size; print one JSON line."""
    from model_runner import threads
    from model_runner.config import RunnerConfig
    from model_runner.runner import ModelRunner

    from .steps import kv_cache_memory, make_prompts, time_decode_step

    n = threads.apply(args.threads or None)
    runner = ModelRunner(RunnerConfig(model=args.model, dtype=args.dtype, kv_cache_memory=kv_cache_memory(
        _model_config(args.model), args.dtype, max(args.batch_sizes), 32 + args.steps + 8)), progress=False)
    ms = {b: 1000 * time_decode_step(runner, make_prompts(runner.tokenizer, b, 32), args.steps)
          for b in args.batch_sizes}
    print(json.dumps({"threads": n, "ms": ms}))


def _model_config(model: str):
    from model_runner.config import ModelConfig
    from model_runner.loader import resolve_model
    return ModelConfig.from_hf_dir(resolve_model(model, progress=False))


def run(args: argparse.Namespace, threads: int, policy: str | None, neighbour: bool, pinned: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    busy, cpu = None, max(os.sched_getaffinity(0))
    others = (os.sched_getaffinity(0) - {cpu}) or {cpu}
    if neighbour:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.contention", "--child", "--threads", str(threads),
                              "--model", args.model, "--dtype", args.dtype, "--steps", str(args.steps),
                              "--batch-sizes", ",".join(map(str, args.batch_sizes))],
                             env=env, capture_output=True, text=True, check=True,
                             preexec_fn=(lambda: os.sched_setaffinity(0, others)) if pinned else None)
    finally:
        if busy:
            busy.kill()
            busy.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", default="1,2,8,32")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size (default: 16)")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.child:
        child(args)
        return {}
    from model_runner.precision import cpu_kind
    started, rows = time.perf_counter(), []
    for label, threads in (("default", 0), ("--threads 1", 1)):
        quiet = run(args, threads, None, neighbour=False)
        rows.append({"configuration": "quiet machine, " + label, "threads": quiet["threads"],
                     **{f"b{b} ms": round(quiet["ms"][str(b)], 1) for b in args.batch_sizes}})
    for label, threads, policy, pinned in CONFIGS:
        r = run(args, threads, policy, neighbour=True, pinned=pinned)
        rows.append({"configuration": "busy neighbour, " + label, "threads": r["threads"],
                     **{f"b{b} ms": round(r["ms"][str(b)], 1) for b in args.batch_sizes}})
    print(f"decode step ms, {args.model} --dtype {args.dtype}, {cpu_model()} ({cpu_kind()}), {os.cpu_count()} CPUs; "
          f"the neighbour spins on CPU {max(os.sched_getaffinity(0))}")
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")
    return finish({"rows": rows, "cpu": cpu_kind()}, args.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
