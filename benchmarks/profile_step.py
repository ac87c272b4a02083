"""Where a model step's time goes, operation by operation: decodes at batch 1, 32, 64 and 128 and one 512-token
prefill of the default model, under torch.profiler, with each native kernel call named as an operation.

    python -m benchmarks.profile_step [--model M] [--dtype auto] [--kv-cache-dtype auto] [--quantization none]
                                      [--steps 5] [--json out.json]

Each row is one kind of operation: its share of the step, milliseconds per step and calls per step. "python
and glue" is the step's wall time that no operation accounts for (the runner's Python, building the step's
tensors, the interpreter between calls). To see an AVX2 machine's profile on an AVX-512 one, run it under
JITNEY_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2.

The profiler costs each operation it records several microseconds, which a batch-1 step's ~150 small calls
turn into a third of the step. So each workload's last line times the same steps again without it: the
matmuls and attention by a clock read around each call, and "outside" is the step's wall time less those two
(the share the issue's target is about).
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from functools import wraps

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from api import flags
from model_runner import linear, model, native, qmatmul, quant
from model_runner.config import RunnerConfig
from model_runner.loader import DEFAULT_MODEL
from model_runner.precision import cpu_kind
from model_runner.runner import ModelRunner

from .machine import cpu_model
from .report import finish
from .steps import random_step

# (name, batch, context lo, context hi, tokens per sequence in the step)
STEPS = [("decode, batch 1, context ~256", 1, 256, 256, 1),
         ("decode, batch 32, context 100..600", 32, 100, 600, 1),
         ("decode, batch 64, context 100..600", 64, 100, 600, 1),  # the batch issue #20's target names
         ("decode, batch 128, context 100..600", 128, 100, 600, 1),
         ("prefill, one 512-token prompt", 1, 512, 512, 512)]
KERNELS = ("paged_attention", "prefill_attention", "rope_write_kv", "add_rms_norm", "silu_mul", "argmax")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization", default="none", choices=quant.MODES, help="as for jitney serve (default: none)")
    p.add_argument("--quant-dense-rows", default="off", metavar="off|auto|N", type=flags.dense_rows,
                   help="as for jitney serve (default: off)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per workload (after one warm-up)")
    p.add_argument("--json", help="write every figure to this file")
    return p.parse_args(argv)


@contextlib.contextmanager
def replaced(targets: list[tuple[object, str, str]], wrap) -> Iterator[None]:
    """Each owner.name (targets: (owner, name, label)) replaced by wrap(original, label) while the block runs, put
    back after it."""
    for owner, name, label in targets:
        fn = getattr(owner, name)
        setattr(owner, name, wraps(fn)(wrap(fn, label)))
    try:
        yield
    finally:
        for owner, name, _ in targets:
            setattr(owner, name, getattr(owner, name).__wrapped__)


def named_native_calls():
    """Each native kernel, and the quantized matmul (--quantization), shown by the profiler as an operation of its
    own (ctypes calls are otherwise invisible to it), while the block runs: record_function costs a little on
    every call, which the unprofiled timing should not pay."""
    def wrap(fn, label):
        def named(*args, **kwargs):
            with record_function(f"native::{label}"):
                return fn(*args, **kwargs)
        return named
    return replaced([(native, k, k) for k in KERNELS] + [(qmatmul, "matmul", "qmatmul")], wrap)


def breakdown(runner: ModelRunner, plan, steps: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """(wall ms per step, {operation: (ms per step, calls per step)}), top-level operations only."""
    runner.execute(plan)  # warm-up: the first call of a shape picks oneDNN kernels
    with named_native_calls(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.execute(plan)
        wall = (time.perf_counter() - t0) * 1000 / steps
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    open_until = -1.0  # operations inside another (aten::linear -> aten::addmm) are counted once, as the outer
    for e in events:
        if e.time_range.start < open_until:
            continue
        open_until = e.time_range.end
        name = e.name.removeprefix("aten::")
        per_op[name][0] += e.cpu_time_total / 1000 / steps
        per_op[name][1] += 1 / steps
    return wall, {k: (v[0], v[1]) for k, v in per_op.items()}


@contextlib.contextmanager
def clocked() -> Iterator[dict[str, float]]:
    """Seconds spent in the model's matmuls (float and quantized, the output head included) and in its attention
    (metadata and kernel), summed while the block runs: one clock read on each side of each call."""
    spent = {"matmuls": 0.0, "attention": 0.0}

    def wrap(fn, kind):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[kind] += time.perf_counter() - t0
        return timed
    with replaced([(linear.Linear, "__call__", "matmuls"), (qmatmul.QuantLinear, "__call__", "matmuls"),
                   (model, "paged_attention", "attention")], wrap):
        yield spent


def unprofiled(runner: ModelRunner, plan, steps: int) -> dict[str, float]:
    """Wall, matmul and attention ms per step, and what is outside the two, with no profiler running."""
    with clocked() as spent:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.execute(plan)
        wall = (time.perf_counter() - t0) * 1000 / steps
    ms = {k: v * 1000 / steps for k, v in spent.items()}
    return {"wall_ms": wall, **{f"{k}_ms": v for k, v in ms.items()}, "outside_ms": wall - sum(ms.values())}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    runner = ModelRunner(RunnerConfig(model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                                      quantization=args.quantization, quant_dense_rows=args.quant_dense_rows,
                                      kv_cache_memory=4 << 30))  # float32 at batch 128 x 600 tokens
    print(f"machine: {cpu_model()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(runner.describe())
    if runner.model.fused is not None:  # one C call would hide every kernel in it from both timings
        runner.model.fused = None
        print("profiled kernel by kernel from Python: the quantized decoder stack's one-call path (fused.py, the same "
              "kernels) is off here; benchmarks.quantization times steps with it")
    results = []
    for name, batch, lo, hi, chunk in STEPS:
        with random_step(runner, batch, lo, hi, chunk) as plan:
            wall, ops = breakdown(runner, plan, args.steps)
            plain = unprofiled(runner, plan, args.steps)
        ops["python and glue"] = (max(0.0, wall - sum(ms for ms, _ in ops.values())), 0.0)
        rows = sorted(ops.items(), key=lambda kv: -kv[1][0])
        print(f"\n{name}: {wall:.1f} ms a step\n\n| operation | share | ms/step | calls/step |\n|---|---|---|---|")
        for op, (ms, calls) in rows[:12]:
            print(f"| {op} | {100 * ms / wall:.0f} % | {ms:.2f} | {calls:.0f} |")
        rest = sum(ms for _, (ms, _) in rows[12:])
        if rest:
            print(f"| (everything else) | {100 * rest / wall:.0f} % | {rest:.2f} | |")
        print(f"\nwithout the profiler: {plain['wall_ms']:.1f} ms a step, matmuls {plain['matmuls_ms']:.1f}, "
              f"attention {plain['attention_ms']:.1f}, outside them {plain['outside_ms']:.1f} ms "
              f"({100 * plain['outside_ms'] / plain['wall_ms']:.0f} %)")
        results.append({"step": name, "wall_ms": round(wall, 2),
                        "ops": {op: {"ms": round(ms, 3), "calls": round(c, 1)} for op, (ms, c) in rows},
                        "unprofiled": {k: round(v, 2) for k, v in plain.items()}})
    return finish({"model": args.model, "precision": runner.precision.describe(), "isa": native.isa(),
                   "cpu": f"{cpu_model()} ({cpu_kind()})", "results": results}, args.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
