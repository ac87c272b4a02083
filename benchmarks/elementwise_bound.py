"""The step's time outside the matmuls and attention, against what bounds it: the residual add + RMSNorm and
SiLU-and-multiply kernels beside a bare PyTorch pass over the same bytes, and, at one row, what a call costs.

    python -m benchmarks.elementwise_bound [--model M] [--rows 1,64,512] [--sets 64] [--rounds 5] [--json out.json]

At prompt-sized steps these kernels only move bytes: SiLU x up reads two [T, inter] halves and writes one,
the fused add + norm reads the residual and the delta and writes both. Their floor on a machine is what the
simplest elementwise pass over the same bytes takes there: here torch.mul over the same two halves into an
output of the same shape (SiLU's bytes exactly), and torch.add of the residual and the delta into a third
tensor (three quarters of the norm's bytes: it writes one tensor, not two). Each is timed over `sets` distinct
buffers in turn, so that a call does not find its operands in the L1 and L2 caches the last call filled (a
model's step reads what the matmul before wrote, which may sit in L3). Both report GB/s on the bytes they move.

At one row a call moves a few kilobytes: its time is the call itself (the argument checks, ctypes, an output
tensor) that a step pays per layer for each kernel. The table's last column multiplies it by the calls a
decode step makes (two norms, one SiLU x up a layer, and one more norm) for the step's total.
"""
from __future__ import annotations

import argparse
import time

import torch

from model_runner import native
from model_runner.config import ModelConfig
from model_runner.loader import DEFAULT_MODEL, resolve_model
from model_runner.precision import cpu_kind, resolve_precision

from .machine import copy_gbps, cpu_model
from .report import finish, ints


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.elementwise_bound", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="whose hidden and intermediate sizes (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="as for jitney serve (default auto)")
    p.add_argument("--rows", type=ints, default=[1, 64, 512], help="rows of the step (default 1,64,512)")
    p.add_argument("--sets", type=int, default=64, help="distinct operand sets a timing cycles through")
    p.add_argument("--rounds", type=int, default=5, help="timed sweeps per cell (the fastest is kept)")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    if min(args.rows) < 1 or args.sets < 1 or args.rounds < 1:
        p.error("--rows, --sets and --rounds take 1 or more")
    return args


def per_call_us(fn, sets: int, rounds: int) -> float:
    """The fastest sweep's microseconds per call, each call on the next operand set."""
    for i in range(sets):  # warm-up: first-touch pages, the library's first call
        fn(i)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(sets):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / sets)
    return best * 1e6


def cells(rows: int, hidden: int, inter: int, dtype: torch.dtype, sets: int,
          layers: int) -> dict[str, tuple[object, int, int]]:
    """name -> (fn(i) on operand set i, bytes it moves, its kernel's calls in a decode step of `layers` layers:
    two norms a layer and the final one, one SiLU x up a layer)."""
    gen = torch.Generator().manual_seed(rows)
    gate_up = [torch.randn(rows, 2 * inter, generator=gen).to(dtype) for _ in range(sets)]
    x = [torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(sets)]
    delta = [torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(sets)]
    out_i = [torch.empty(rows, inter, dtype=dtype) for _ in range(sets)]
    out_h = [torch.empty(rows, hidden, dtype=dtype) for _ in range(sets)]
    weight = torch.ones(hidden, dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    silu_bytes, silu_calls = 3 * rows * inter * size, layers
    norm_calls = 2 * layers + 1
    return {
        "silu_mul (native)": (lambda i: native.silu_mul(gate_up[i]), silu_bytes, silu_calls),
        "bare mul, the same bytes": (lambda i: torch.mul(gate_up[i][:, :inter], gate_up[i][:, inter:], out=out_i[i]),
                                     silu_bytes, silu_calls),
        "add_rms_norm (native)": (lambda i: native.add_rms_norm(x[i], delta[i], weight, 1e-5),
                                  4 * rows * hidden * size, norm_calls),
        "bare add, 3/4 of its bytes": (lambda i: torch.add(x[i], delta[i], out=out_h[i]), 3 * rows * hidden * size,
                                       norm_calls),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    mc = ModelConfig.from_hf_dir(resolve_model(args.model, progress=False))
    dtype = resolve_precision(args.dtype, "auto", "cpu").compute
    print(f"machine: {cpu_model()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    if not native.elementwise_supported("cpu", dtype):
        print(f"no native elementwise kernels for {dtype} here: nothing to bound")
        return finish({"rows": []}, args.json, started)
    copy = copy_gbps()
    layers = mc.num_hidden_layers
    print(f"{args.model}: hidden {mc.hidden_size}, intermediate {mc.intermediate_size}, {dtype}; "
          f"copy bandwidth {copy:.1f} GB/s; {2 * layers + 1} norm and {layers} SiLU x up calls a step\n")
    print("| rows | kernel | us a call | GB/s | us x calls a step |\n|---:|---|---:|---:|---:|")
    results = []
    for rows in args.rows:
        for name, (fn, nbytes, n) in cells(rows, mc.hidden_size, mc.intermediate_size, dtype, args.sets,
                                           layers).items():
            us = per_call_us(fn, args.sets, args.rounds)
            print(f"| {rows} | {name} | {us:.1f} | {nbytes / us / 1e3:.1f} | {us * n / 1000:.2f} ms |")
            results.append({"rows": rows, "kernel": name, "us": round(us, 2), "gbps": round(nbytes / us / 1e3, 2),
                            "step_ms": round(us * n / 1000, 3)})
    return finish({"cpu": f"{cpu_model()} ({cpu_kind()})", "dtype": str(dtype), "copy_gbps": round(copy, 2),
                   "rows": results}, args.json, started)


if __name__ == "__main__":
    main()
