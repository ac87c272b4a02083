"""The prompt-attention kernels alone: one prompt chunk's attention over every layer, by the tiled kernel
(csrc/prefill_attention.cpp) and by the row kernel (csrc/paged_attention.cpp), with the GFLOP/s each achieves
on causal attention's multiply-adds beside the machine's matmul ceiling in the same dtype.

    python -m benchmarks.prefill_attention [--prompts 0:128,0:512,0:2048,1024:512] [--dtype auto]
                                           [--kv-cache-dtype auto] [--reps 5] [--json out.json]

Each prompt is `first:rows`: a chunk of `rows` tokens after `first` cached ones (0: a fresh prompt). The
default model's shape (SmolLM2-135M: 30 layers, 9 query heads over 3 kv heads of 64), queries in the dtype
jitney serves in here (--dtype, as `jitney serve`'s) over a cache of --kv-cache-dtype, 16-token blocks scattered
over the cache as a server's are. Where the tiled kernel does not run (it is bfloat16 on AVX512-BF16), the
row kernel is timed alone; where it has two loops (AMX tiles and VDPBF16PS dot products, on an Intel Xeon with
AMX, over a bfloat16 cache), "tiled" is the one jitney runs (AMX) and the other is printed beside it. FLOPs counted: 4 x heads x head_dim per
(query, visible key) pair, the two products of causal attention (what the row kernel computes; the tiled one
also multiplies the masked part of each 64-key diagonal tile, not counted). The ceiling is benchmarks.machine's
matmul in the queries' dtype (torch.mm or oneDNN's packed linear, 2048^3, best of ten).
"""
from __future__ import annotations

import argparse
import time

import torch

from model_runner import native
from model_runner.errors import ModelLoadError
from model_runner.precision import cpu_has_native_bf16, cpu_kind, dtype_name, resolve_precision

from .decode_attention import add_shape_args, make_cache
from .machine import NeighbourMeter, best_seconds, cpu_model, matmul_gflops
from .report import finish


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="0:128,0:512,0:2048,1024:512",
                   help="first:rows chunks, comma-separated (first = tokens already cached)")
    add_shape_args(p)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="the queries' dtype, as jitney serve's --dtype (auto: bfloat16 where the CPU has it natively, "
                        "else float32)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "float32", "int8"], default="auto",
                   help="as jitney serve's (auto: the queries' dtype)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per cell (the fastest is kept)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    a.prompts = [tuple(int(x) for x in c.split(":")) for c in a.prompts.split(",")]
    return a


def causal_flops(a: argparse.Namespace, first: int, rows: int) -> int:
    """Both products over every (query, visible key) pair of the chunk, every layer."""
    pairs = rows * first + rows * (rows + 1) // 2
    return 4 * a.heads * a.head_dim * pairs * a.layers


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    started = time.perf_counter()
    try:
        precision = resolve_precision(a.dtype, a.kv_cache_dtype, "cpu")
    except ModelLoadError as e:
        raise SystemExit(f"python -m benchmarks.prefill_attention: {e}") from None
    dtype, kv_dtype = precision.compute, precision.kv_cache
    if dtype == torch.bfloat16 and not cpu_has_native_bf16():
        print(f"note: this CPU ({cpu_kind()}) has no bfloat16 arithmetic: the bfloat16 matmul ceiling and kernels "
              "are emulated and take minutes; --dtype auto measures what jitney serves in here", flush=True)
    tiled = native.prefill_supported(dtype, kv_dtype, a.heads, a.kv_heads, a.head_dim)
    loops = native.prefill_loops(kv_dtype) if tiled else []
    ceiling = matmul_gflops(dtype)
    cpu = (f"{cpu_model()} ({cpu_kind()}), {torch.get_num_threads()} threads, {native.isa()} loop"
           + (f", tiled prompts on {loops[0]}" if loops else ""))
    print(f"# prompt attention, {dtype_name(dtype)} queries over a {dtype_name(kv_dtype)} KV cache: {cpu}; {dtype_name(dtype)} matmul "
          f"ceiling {ceiling:,.0f} GFLOP/s" + ("" if tiled else "\n# the tiled kernel does not run here (bfloat16 on "
                                               "AVX512-BF16 only): the row kernel alone"), "\n")
    blocks = max(-(-(f + r) // a.block_size) for f, r in a.prompts)
    cache = make_cache(a, kv_dtype, blocks + 1)
    table = torch.randperm(blocks + 1)[:blocks].to(torch.int32)  # scattered blocks
    meter, rows = NeighbourMeter(), []
    for first, n in a.prompts:
        q = torch.randn(a.layers, n, a.heads, a.head_dim).to(dtype)
        tables = table.expand(n, -1).contiguous()
        lens = torch.arange(first + 1, first + n + 1, dtype=torch.int32)
        chunks = torch.tensor([[0, n, first]], dtype=torch.int32)
        out = torch.empty(n, a.heads, a.head_dim, dtype=dtype)
        scale = a.head_dim ** -0.5
        kernels = {"row": lambda: [native.paged_attention(q[i], cache[i], tables, lens, scale) for i in range(a.layers)]}
        for loop in loops:  # "tiled": the loop jitney runs (AMX where the CPU has it); the others beside it
            kernels["tiled" if loop == loops[0] else f"tiled_{loop}"] = (
                lambda loop=loop: [native.prefill_attention(q[i], cache[i], tables, chunks, scale, out, loop)
                                   for i in range(a.layers)])
        flops = causal_flops(a, first, n)
        ms = {k: 1e3 * best_seconds(fn, a.reps) for k, fn in kernels.items()}
        best = min(ms.values())
        rows.append(dict(first=first, rows=n, gflop=round(flops / 1e9, 2),
                         **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
                         **{f"{k}_gflops": round(flops / v / 1e6, 1) for k, v in ms.items()},
                         best_of_ceiling=round(flops / best / 1e6 / ceiling, 3)))
        r = rows[-1]
        print(f"  {first} cached + {n}: " + (f"tiled {r['tiled_ms']} ms ({r['tiled_gflops']} GFLOP/s), " if tiled else "")
              + "".join(f"{k[6:]} loop {r[f'{k}_ms']} ms ({r[f'{k}_gflops']} GFLOP/s), " for k in kernels
                        if k.startswith("tiled_"))
              + f"row kernel {r['row_ms']} ms ({r['row_gflops']} GFLOP/s); the fastest at "
              f"{100 * r['best_of_ceiling']:.0f} % of the ceiling", flush=True)
    print(f"\n| chunk (cached + new) | GFLOP | tiled ms | tiled GFLOP/s | row kernel ms | row kernel GFLOP/s | speed-up "
          f"| the fastest, of the {dtype_name(dtype)} matmul ceiling |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = (f"{r['tiled_ms']:.1f} | {r['tiled_gflops']:.0f}", f"{r['row_ms'] / r['tiled_ms']:.2f}x") if tiled else ("- | -", "-")
        print(f"| {r['first']} + {r['rows']} | {r['gflop']:.1f} | {t[0]} | {r['row_ms']:.1f} | {r['row_gflops']:.0f} | "
              f"{t[1]} | {100 * r['best_of_ceiling']:.0f} % |")
    print(f"\nother processes used {100 * meter.share():.0f}% of the CPUs meanwhile")
    return finish(dict(cpu=cpu, dtype=dtype_name(dtype), kv_cache_dtype=dtype_name(kv_dtype), tiled=tiled,
                       matmul_ceiling_gflops=ceiling, rows=rows), a.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # on the thread every step runs on: one OpenMP pool
