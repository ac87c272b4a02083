"""The decode-attention kernel alone, by KV-cache dtype: the time of one decode step's attention (every
layer's call) at batch 64 and 128 with contexts of 100..600 tokens, and the bandwidth it achieves on the bytes
it reads, beside the machine's copy bandwidth.

    python -m benchmarks.decode_attention [--precisions bfloat16:bfloat16,bfloat16:int8] [--batches 64,128]
                                          [--rounds 10] [--resident] [--json out.json]

The default model's shape (SmolLM2-135M: 30 layers, 9 query heads over 3 kv heads of 64; --layers etc. to
change it), 16-token blocks scattered over the cache as a server's are, one call per layer as a step makes
them: the layers' caches together (about 1 GB of bfloat16 at batch 128) are far larger than the CPU's caches,
as in a real step, so the figure is not flattered by a layer that stays in L3. Bytes read: every K and V row
each query attends to (head_dim values, and an int8 row's 4-byte scale); queries and outputs are under 0.1 %
of that and not counted. Copy bandwidth is benchmarks.machine's (bytes read + bytes written by a large copy),
read bandwidth its large sum's (bytes read): both stream long runs of memory, which the hardware prefetchers
follow. Decode attention reads short runs scattered over the cache (a block of one kv head: 2 KB of bfloat16 at
16 tokens of head_dim 64). The "bare read" column is what this machine gives that pattern: the same bytes in
the same order and the same task split, folded into a checksum and nothing else (benchmarks/csrc/read_blocks.cpp),
with no prefetching, with the kernel's (the next 3 blocks into L2) and with twice that; the fastest is kept. The
kernel cannot read faster than that, so "of bare read" is its share of the bound its access pattern sets, and
the gap from there to the copy bandwidth belongs to the memory system and the layout, not to the kernel.
With --resident every sequence and layer reads the same few blocks instead, which stay in the core's L2: the
same instructions with memory out of the way, so the two runs together say whether the kernel waits on memory
or on its own arithmetic. Every cell is timed once per round, the rounds going over all cells in turn, and
keeps its fastest step (the bandwidths too): on a machine shared with bursts of other work each cell then finds
a quiet moment.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import random
import time
from functools import cache
from pathlib import Path

import torch

from model_runner import native
from model_runner.int8_kv import quantize_rows
from model_runner.kv_cache import kv_row_elements
from model_runner.precision import KV_DTYPES, cpu_kind

from .machine import NeighbourMeter, best_seconds, copy_gbps, cpu_model, read_gbps
from .report import finish


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The attention shape both attention benchmarks time (the default model's, SmolLM2-135M)."""
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="bfloat16:bfloat16,bfloat16:int8",
                   help="compute:KV-cache dtype pairs, comma-separated (e.g. float32:float32,float32:int8)")
    p.add_argument("--batches", default="64,128")
    p.add_argument("--context", default="100,600", help="lo,hi: each sequence's context drawn in this range")
    add_shape_args(p)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per cell, one per round (the fastest is kept)")
    p.add_argument("--resident", action="store_true",
                   help="every sequence reads the same blocks of one layer's cache, which then stay in the core's "
                        "L2: the same arithmetic with memory out of the way, the kernel's own ceiling")
    p.add_argument("--json")
    a = p.parse_args(argv)
    a.precisions = [tuple(x.split(":")) for x in a.precisions.split(",")]
    a.batches = [int(b) for b in a.batches.split(",")]
    a.context = tuple(int(c) for c in a.context.split(","))
    return a


def make_cache(a: argparse.Namespace, dtype: torch.dtype, num_blocks: int) -> torch.Tensor:
    """[layers, 2, kv_heads, blocks, block_size, row] of random keys and values, as the runner allocates it."""
    shape = (a.layers, 2, a.kv_heads, num_blocks, a.block_size)
    cache = torch.empty(*shape, kv_row_elements(a.head_dim, dtype), dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for layer in range(a.layers):  # a layer at a time: float32 randoms of every layer at once would not fit
        x = torch.randn(*shape[1:], a.head_dim, generator=gen)
        cache[layer] = quantize_rows(x) if dtype == torch.int8 else x.to(dtype)
    return cache


def step_case(a: argparse.Namespace, batch: int, num_blocks: int, seed: int = 0):
    """Block tables (scattered blocks, none shared; with --resident, every sequence the cache's first blocks) and
    context lengths for `batch` decoding sequences."""
    rng = random.Random(seed)
    lens = [rng.randint(*a.context) for _ in range(batch)]
    order = list(range(num_blocks))
    rng.shuffle(order)
    width = -(-max(lens) // a.block_size)
    tables, used = torch.zeros(batch, width, dtype=torch.int32), 0
    for i, n in enumerate(lens):
        k = -(-n // a.block_size)
        tables[i, :k] = torch.arange(k) if a.resident else torch.tensor(order[used: used + k], dtype=torch.int32)
        used += k
    return tables, torch.tensor(lens, dtype=torch.int32)


@cache
def bare_read_library() -> ctypes.CDLL | None:
    """benchmarks/csrc/read_blocks.cpp, built as the kernels are (None where they cannot be)."""
    def declare(lib: ctypes.CDLL) -> None:
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.jitney_read_blocks.argtypes = [ptr, ptr, i64, ptr, i64, i32, i64, i32, i64, i32]
        lib.jitney_read_blocks.restype = ctypes.c_uint64
    return native.load_source(Path(__file__).parent / "csrc" / "read_blocks.cpp", declare, "no bare-read column")


# Blocks the bare read asks for ahead: none, the kernel's 3 (csrc/paged_attention.cpp, prefetch_ahead) and twice
# that; the fastest is the bound.
BARE_AHEAD = (0, 3, 6)


def bare_read(layer_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, ahead: int = 3) -> int:
    """Reads what paged_attention reads of this layer's cache [2, kv_heads, blocks, block_size, row], and only
    that, asking for the next `ahead` blocks into L2 as it goes; returns a checksum of it."""
    _, kv_heads, num_blocks, block_size, row = layer_cache.shape
    assert layer_cache.is_contiguous() and tables.stride(1) == 1 and lens.is_contiguous()
    return bare_read_library().jitney_read_blocks(layer_cache.data_ptr(), tables.data_ptr(), tables.stride(0),
                                                  lens.data_ptr(), lens.shape[0], kv_heads, num_blocks, block_size,
                                                  row * layer_cache.element_size(), ahead)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    started = time.perf_counter()
    if native.library() is None:
        print("the native kernels are not built here (no compiler, or JITNEY_NATIVE=0): nothing to time")
        return finish({"rows": []}, a.json, started)
    cpu = f"{cpu_model()} ({cpu_kind()}), {torch.get_num_threads()} threads, {native.isa()} loop"
    print(f"# decode attention: {cpu}\n")
    blocks_needed = max(a.batches) * (-(-a.context[1] // a.block_size))
    cells, caches = [], {}
    for compute, kv in a.precisions:
        q_dtype, kv_dtype = KV_DTYPES[compute], KV_DTYPES[kv]
        if not native.supported("cpu", q_dtype, a.heads, a.kv_heads, a.head_dim, a.block_size, kv_dtype):
            print(f"{compute}:{kv}: not a pair the native kernel takes here; skipped")
            continue
        if kv not in caches:  # one cache per KV dtype, shared by the compute dtypes that read it
            caches[kv] = make_cache(a, kv_dtype, blocks_needed)
        for batch in a.batches:
            tables, lens = step_case(a, batch, blocks_needed)
            q = torch.randn(a.layers, batch, a.heads, a.head_dim).to(q_dtype)
            row_bytes = kv_row_elements(a.head_dim, kv_dtype) * caches[kv].element_size()
            cells.append(dict(compute=compute, kv=kv, batch=batch, q=q, tables=tables, lens=lens, best=math.inf,
                              bare=math.inf, read=int(lens.sum()) * a.layers * 2 * a.kv_heads * row_bytes))
    meter, gbps, read, has_bare = NeighbourMeter(), 0.0, 0.0, bare_read_library() is not None
    for _ in range(a.rounds):
        gbps = max(gbps, copy_gbps(2**28, reps=1))
        read = max(read, read_gbps(2**28, reps=1))
        for c in cells:
            cache = caches[c["kv"]]
            c["best"] = min(c["best"], best_seconds(
                lambda: [native.paged_attention(c["q"][layer], cache[0 if a.resident else layer], c["tables"],
                                                c["lens"], a.head_dim ** -0.5) for layer in range(a.layers)], 1))
            for ahead in BARE_AHEAD if has_bare else ():  # the same blocks read bare, right after
                c["bare"] = min(c["bare"], best_seconds(
                    lambda: [bare_read(cache[0 if a.resident else layer], c["tables"], c["lens"], ahead)
                             for layer in range(a.layers)], 1))
    # Rates stay unrounded (the table rounds when it prints): a tiny shape's share of bandwidth is well under 1 %,
    # and rounded it would read as a zero rate.
    rows = [dict(compute=c["compute"], kv=c["kv"], batch=c["batch"], ms=1e3 * c["best"],
                 mb_read=round(c["read"] / 1e6, 1), gb_s=c["read"] / c["best"] / 1e9,
                 of_copy=c["read"] / c["best"] / 1e9 / gbps, of_read=c["read"] / c["best"] / 1e9 / read,
                 bare_gb_s=c["read"] / c["bare"] / 1e9 if has_bare else None,
                 of_bare=c["bare"] / c["best"] if has_bare else None)
            for c in cells]
    if a.resident:
        print("--resident: every sequence and layer reads the same blocks, from L2: GB/s here is the rate of the "
              "kernel's arithmetic on those bytes, not a bandwidth")
    print(f"copy bandwidth {gbps:.1f} GB/s (read + written), read bandwidth {read:.1f} GB/s (a sum)\n\n"
          f"| compute | KV cache | batch | ms a step ({a.layers} layers) | MB read | GB/s | of copy bandwidth "
          "| of read bandwidth | bare read GB/s | of bare read |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bare = f"{r['bare_gb_s']:.1f} | {100 * r['of_bare']:.0f} %" if has_bare else "- | -"
        print(f"| {r['compute']} | {r['kv']} | {r['batch']} | {r['ms']:.1f} | {r['mb_read']:.0f} | {r['gb_s']:.1f} | "
              f"{100 * r['of_copy']:.0f} % | {100 * r['of_read']:.0f} % | {bare} |")
    print(f"\nother processes used {100 * meter.share():.0f}% of the CPUs meanwhile")
    return finish(dict(cpu=cpu, copy_gbps=gbps, read_gbps=read, resident=a.resident, rows=rows), a.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # on the thread every step runs on: one OpenMP pool
