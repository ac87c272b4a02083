"""Native kernels against the PyTorch path they replace: whole model steps of the default model, timed with
the PyTorch path, with native attention (and K/V writes), and with the native elementwise ops on top.

    python -m benchmarks.kernels [--model M] [--dtype bfloat16] [--steps 5] [--json out.json]

Three steps: a batch-64 decode at ~64 tokens of context (the micro-benchmark's shape), a batch-96 decode at
300..700 tokens of context (the middle of the vLLM burst workload), and one 512-token prompt. The K/V cache
holds whatever the blocks last held: attention costs the same whatever the values.
"""
from __future__ import annotations

import argparse
import time

import torch

from model_runner.config import RunnerConfig
from model_runner.loader import DEFAULT_MODEL
from model_runner.runner import ModelRunner

from .machine import NeighbourMeter, best_seconds, cpu_model
from .report import finish
from .steps import random_step

# (name, batch, context lo, context hi, tokens per sequence in the step)
WORKLOADS = [("decode, batch 64, context ~64", 64, 48, 80, 1),
             ("decode, batch 96, context 300..700", 96, 300, 700, 1),
             ("prefill, one 512-token prompt", 1, 512, 512, 512)]
PATHS = [("PyTorch", False, False), ("+ native attention", True, False), ("+ native norm, SiLU", True, True)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=5, help="timed steps per cell (the fastest is kept)")
    p.add_argument("--json", help="write every figure to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    runner = ModelRunner(RunnerConfig(model=args.model, dtype=args.dtype, kv_cache_memory=4 << 30))  # float32 at batch 96 x 700 tokens
    native_attention = runner.native_kernels[0]
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(runner.describe())
    if not native_attention:
        print("the native kernels are not in use here (no compiler, JITNEY_NATIVE=0, or not a CPU): nothing to compare")
        return finish({"rows": []}, args.json, started)
    meter, rows = NeighbourMeter(), []
    for name, batch, lo, hi, chunk in WORKLOADS:
        ms = {}
        with random_step(runner, batch, lo, hi, chunk) as plan:
            for label, attention, elementwise in PATHS:
                runner.use_kernels(attention, elementwise)
                runner.execute(plan)  # warm-up: the first call of a shape picks oneDNN kernels
                ms[label] = 1000 * best_seconds(lambda: runner.execute(plan), args.steps)
        base = ms[PATHS[0][0]]
        rows.append({"step": name, **{k: round(v, 2) for k, v in ms.items()},
                     "speed-up": round(base / ms[PATHS[-1][0]], 2)})
    runner.use_kernels(True, True)  # back to every native path that builds here
    header = ["step"] + [f"{label} ms" for label, _, _ in PATHS] + ["speed-up"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['step']} | " + " | ".join(f"{r[label]:.1f}" for label, _, _ in PATHS) + f" | {r['speed-up']:.2f}x |")
    print(f"\nother processes used {100 * meter.share():.0f}% of the CPUs meanwhile")
    return finish({"model": args.model, "dtype": args.dtype, "rows": rows}, args.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
