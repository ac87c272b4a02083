"""The prompt-attention kernels alone: one prompt chunk's attention over every layer, by the tiled kernel
(csrc/prefill_attention.cpp) and by the row kernel (csrc/paged_attention.cpp), with the GFLOP/s each achieves
on causal attention's multiply-adds beside the machine's matmul ceiling in the same dtype.

    python -m benchmarks.prefill_attention [--prompts 0:128,0:512,0:2048,1024:512] [--kv-cache-dtype int8]
                                           [--reps 5] [--json out.json]

Each prompt is `first:rows`: a chunk of `rows` tokens after `first` cached ones (0: a fresh prompt). The
default model's shape (SmolLM2-135M: 30 layers, 9 query heads over 3 kv heads of 64), bfloat16 queries over a
bfloat16 cache (or an int8 one: --kv-cache-dtype int8), 16-token blocks scattered over the cache as a server's are. FLOPs counted: 4 x heads x head_dim per
(query, visible key) pair, the two products of causal attention (what the row kernel computes; the tiled one
also multiplies the masked part of each 64-key diagonal tile, not counted). The ceiling is benchmarks.machine's
bfloat16 matmul (torch.mm or oneDNN's packed linear, 2048^3, best of ten).
"""
from __future__ import annotations

import argparse
import time

import torch

from model_runner import native
from model_runner.precision import cpu_kind

from .decode_attention import add_shape_args, make_cache
from .machine import NeighbourMeter, best_seconds, cpu_model, matmul_gflops
from .report import finish


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="0:128,0:512,0:2048,1024:512",
                   help="first:rows chunks, comma-separated (first = tokens already cached)")
    add_shape_args(p)
    p.add_argument("--kv-cache-dtype", choices=["bfloat16", "int8"], default="bfloat16")
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
    kv_dtype = getattr(torch, a.kv_cache_dtype)
    if not native.prefill_supported(torch.bfloat16, kv_dtype, a.heads, a.kv_heads, a.head_dim):
        print("the tiled prompt kernel does not run here (it needs AVX512-BF16 and the native kernels): nothing "
              "to compare")
        return finish({"rows": []}, a.json, started)
    ceiling = matmul_gflops(torch.bfloat16)
    cpu = f"{cpu_model()} ({cpu_kind()}), {torch.get_num_threads()} threads, {native.isa()} loop"
    print(f"# prompt attention, {a.kv_cache_dtype} KV cache: {cpu}; bfloat16 matmul ceiling {ceiling:,.0f} "
          "GFLOP/s\n")
    blocks = max(-(-(f + r) // a.block_size) for f, r in a.prompts)
    cache = make_cache(a, kv_dtype, blocks + 1)
    table = torch.randperm(blocks + 1)[:blocks].to(torch.int32)  # scattered blocks
    meter, rows = NeighbourMeter(), []
    for first, n in a.prompts:
        q = torch.randn(a.layers, n, a.heads, a.head_dim).bfloat16()
        tables = table.expand(n, -1).contiguous()
        lens = torch.arange(first + 1, first + n + 1, dtype=torch.int32)
        chunks = torch.tensor([[0, n, first]], dtype=torch.int32)
        out = torch.empty(n, a.heads, a.head_dim, dtype=torch.bfloat16)
        scale = a.head_dim ** -0.5
        kernels = {
            "tiled": lambda: [native.prefill_attention(q[i], cache[i], tables, chunks, scale, out)
                              for i in range(a.layers)],
            "row": lambda: [native.paged_attention(q[i], cache[i], tables, lens, scale) for i in range(a.layers)],
        }
        flops = causal_flops(a, first, n)
        ms = {k: 1e3 * best_seconds(fn, a.reps) for k, fn in kernels.items()}
        rows.append(dict(first=first, rows=n, gflop=round(flops / 1e9, 2),
                         **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
                         **{f"{k}_gflops": round(flops / v / 1e6, 1) for k, v in ms.items()},
                         tiled_of_ceiling=round(flops / ms["tiled"] / 1e6 / ceiling, 3)))
        r = rows[-1]
        print(f"  {first} cached + {n}: tiled {r['tiled_ms']} ms ({r['tiled_gflops']} GFLOP/s, "
              f"{100 * r['tiled_of_ceiling']:.0f} % of the ceiling), row kernel {r['row_ms']} ms "
              f"({r['row_gflops']} GFLOP/s)", flush=True)
    print("\n| chunk (cached + new) | GFLOP | tiled ms | tiled GFLOP/s | of the bf16 matmul ceiling | row kernel ms "
          "| row kernel GFLOP/s | speed-up |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['first']} + {r['rows']} | {r['gflop']:.1f} | {r['tiled_ms']:.1f} | {r['tiled_gflops']:.0f} | "
              f"{100 * r['tiled_of_ceiling']:.0f} % | {r['row_ms']:.1f} | {r['row_gflops']:.0f} | "
              f"{r['row_ms'] / r['tiled_ms']:.2f}x |")
    print(f"\nother processes used {100 * meter.share():.0f}% of the CPUs meanwhile")
    return finish(dict(cpu=cpu, kv_cache_dtype=a.kv_cache_dtype, matmul_ceiling_gflops=ceiling, rows=rows), a.json,
                  started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # on the thread every step runs on: one OpenMP pool
