"""The layer matmuls of a small-batch bfloat16 decode step, alone: oneDNN's packed kernel (what the model runs)
against a loop that reads each weight once with software prefetch, beside the machine's read bandwidth.

    python -m benchmarks.small_matmul [--model M] [--rows 1,4] [--ahead 0,8,16,32] [--rounds 7] [--json out.json]

Every layer's four matmuls (q/k/v fused, o, gate/up fused, down) over the model's own bfloat16 weights, one
after another as a step makes them, so the weights stream from memory (SmolLM2-135M's layers hold 202 MiB) and
no layer's weights sit in cache for the next call. At one to four rows a decode step's matmuls only read
weights: their time is bounded below by the bytes at the read bandwidth (benchmarks.machine's large sum). The
second loop (benchmarks/csrc/gemv_bf16.cpp: VDPBF16PS, four output rows at a time, the weights `ahead` groups
further on asked for into L1 first) shows how much of the gap between oneDNN and that bound a kernel can close
on this machine; its results are checked against float64 with the bounds bfloat16 sets. It is a measurement,
not a path the engine takes. Needs AVX512-BF16 (Zen 4, Intel Xeons from Cooper Lake on); elsewhere it says so.
Every cell is timed once per round over all cells in turn and keeps its fastest sweep.
"""
from __future__ import annotations

import argparse
import ctypes
import time
from functools import cache
from pathlib import Path

import torch

from model_runner import native
from model_runner.config import ModelConfig
from model_runner.linear import Linear
from model_runner.loader import DEFAULT_MODEL, load_model_dir
from model_runner.precision import cpu_kind

from .machine import cpu_model, read_gbps
from .report import finish, ints

MAX_ROWS = 4  # the loop's accumulators: gemv_bf16.cpp's MMAX


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_matmul", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--rows", type=ints, default=[1, 4], help=f"rows of the step, each 1..{MAX_ROWS} (default 1,4)")
    p.add_argument("--ahead", type=ints, default=[0, 8, 16, 32],
                   help="prefetch distances to try, in groups of four output rows (0: none); the fastest is kept")
    p.add_argument("--rounds", type=int, default=7, help="timed sweeps per cell (the fastest is kept)")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    if not all(1 <= r <= MAX_ROWS for r in args.rows) or min(args.ahead) < 0:
        p.error(f"--rows take 1..{MAX_ROWS}, --ahead 0 or more")
    return args


@cache
def library() -> ctypes.CDLL | None:
    """benchmarks/csrc/gemv_bf16.cpp, built as the kernels are (None where they cannot be)."""
    def declare(lib: ctypes.CDLL) -> None:
        lib.jitney_gemv_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
        lib.jitney_gemv_bf16.restype = None
        lib.jitney_gemv_bf16_available.restype = ctypes.c_int
    return native.load_source(Path(__file__).parent / "csrc" / "gemv_bf16.cpp", declare, "no prefetching loop")


def prefetching(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, ahead: int) -> torch.Tensor:
    library().jitney_gemv_bf16(w.data_ptr(), x.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1], x.shape[0], ahead)
    return out


def layer_weights(model: str) -> list[torch.Tensor]:
    """Each layer's four matmul weights in bfloat16, [out, in], as model.py fuses them."""
    path, w, _ = load_model_dir(model, progress=False)
    out = []
    for i in range(ModelConfig.from_hf_dir(path).num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        parts = [[a + "q_proj", a + "k_proj", a + "v_proj"], [a + "o_proj"], [m + "gate_proj", m + "up_proj"],
                 [m + "down_proj"]]
        out += [torch.cat([w[p + ".weight"] for p in names]).to(torch.bfloat16).contiguous() for names in parts]
    return out


def check(weights: list[torch.Tensor], rows: int) -> float:
    """The loop's largest error against float64 over the first layer's matmuls, as a share of its bound:
    rounding to bfloat16 (2^-8 of the value) plus float32 sums (k * 2^-24 of the sum of |w x|). Raises above 1."""
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for w in weights[:4]:
        x = torch.randn(rows, w.shape[1], generator=gen).to(torch.bfloat16)
        got = prefetching(w, x, torch.empty(rows, w.shape[0], dtype=torch.bfloat16), 8).double()
        ref = x.double() @ w.double().T
        bound = 2.0 ** -8 * ref.abs() + w.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T) + 1e-30
        worst = max(worst, ((got - ref).abs() / bound).max().item())
    if worst > 1:
        raise AssertionError(f"the prefetching loop is off by {worst:.2f}x the bfloat16 bound")
    return worst


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"machine: {cpu_model()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    lib = library()
    if lib is None or not lib.jitney_gemv_bf16_available():
        print("this CPU (or build) has no AVX512-BF16: only oneDNN's kernel is timed")
    weights = layer_weights(args.model)
    packed = [Linear(w) for w in weights]
    nbytes = sum(w.numel() * 2 for w in weights)
    read = read_gbps()
    print(f"{len(weights)} matmuls, {nbytes / 2**20:.0f} MiB of bfloat16 weights; read bandwidth {read:.1f} GB/s: "
          f"{nbytes / read / 1e6:.2f} ms to read them")
    has_loop = lib is not None and lib.jitney_gemv_bf16_available()
    cells: dict[tuple[int, str], float] = {}
    sweeps = {}
    for rows in args.rows:
        xs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in {w.shape[1] for w in weights}}
        outs = [torch.empty(rows, w.shape[0], dtype=torch.bfloat16) for w in weights]
        sweeps[(rows, "onednn")] = lambda xs=xs: [p(xs[p.in_features]) for p in packed]
        if has_loop:
            for a in args.ahead:
                sweeps[(rows, f"ahead {a}")] = lambda xs=xs, outs=outs, a=a: [
                    prefetching(w, xs[w.shape[1]], o, a) for w, o in zip(weights, outs)]
    for fn in sweeps.values():
        fn()  # warm-up: oneDNN picks its kernels
    for _ in range(args.rounds):
        for cell, fn in sweeps.items():
            t0 = time.perf_counter()
            fn()
            cells[cell] = min(cells.get(cell, float("inf")), time.perf_counter() - t0)
    print("\n| rows | oneDNN packed: ms | GB/s | prefetching loop: ms | GB/s | best ahead | loop / oneDNN | "
          "oneDNN / read time |\n|---|---|---|---|---|---|---|---|")
    results = []
    for rows in args.rows:
        one = cells[(rows, "onednn")]
        row = {"rows": rows, "onednn_ms": 1e3 * one, "read_ms": nbytes / read / 1e6}
        if has_loop:
            best = min(args.ahead, key=lambda a: cells[(rows, f"ahead {a}")])
            loop = cells[(rows, f"ahead {best}")]
            row.update(loop_ms=1e3 * loop, best_ahead=best, error_of_bound=check(weights, rows),
                       by_ahead={a: 1e3 * cells[(rows, f"ahead {a}")] for a in args.ahead})
            print(f"| {rows} | {1e3 * one:.2f} | {nbytes / one / 1e9:.1f} | {1e3 * loop:.2f} | "
                  f"{nbytes / loop / 1e9:.1f} | {best} | {one / loop:.2f}x faster | {one * read * 1e9 / nbytes:.2f}x |")
        else:
            print(f"| {rows} | {1e3 * one:.2f} | {nbytes / one / 1e9:.1f} | - | - | - | - | "
                  f"{one * read * 1e9 / nbytes:.2f}x |")
        results.append(row)
    return finish({"model": args.model, "cpu": f"{cpu_model()} ({cpu_kind()})", "weight_bytes": nbytes,
                   "read_gbps": read, "results": results}, args.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
