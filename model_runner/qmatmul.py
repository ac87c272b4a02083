"""The quantized matmul's two paths (model_runner/quant.py holds the formats and their weights):

  integer  csrc/qmatmul.cpp's loop over the tiles as stored, activations as 16-bit integers per block of 32;
  dense    the weights dequantized a slice at a time into a cached buffer, each slice through torch's matmul;
           or, with --quant-dense-weights resident, dequantized once at load and kept (QuantLinear.keep_dequantized).

QuantLinear is the layer the model calls: choose_path picks the path by the rows of x (a step's tokens) against
the model's dense_min_rows (--quant-dense-rows; off by default, so the integer loop always).
"""
from __future__ import annotations

import ctypes
import threading
from functools import cache

import torch
import torch.nn.functional as F

from . import quant
from .errors import ModelLoadError
from .linear import Linear
from .quant import DENSE_WEIGHTS, TILE, QuantWeight

# --- the matmul: the integer loop for small batches, the compute dtype's own matmul over dequantized slices for
# large ones -------------------------------------------------------------------------------------------------

# `--quant-dense-rows auto` (RunnerConfig.quant_dense_rows): from this many rows (tokens in a step) a bfloat16
# matmul on a CPU with native bfloat16 dot products dequantizes the weights slice by slice and multiplies through
# torch (oneDNN), below it the integer loop runs. Measured on AMD Zen 4 (AVX512-BF16, no AMX; docs/quantization.md):
# the matmuls of a default-model step take 37.3 ms integer / 41.9 ms dense at 24 rows, 48.3 / 47.2 at 32, and the
# dense path wins by more from there. With AMX (Intel Xeon) oneDNN's bfloat16 matmul is several times faster again
# while the dequantization costs the same, but there the integer loop sums 16 rows at a time on the AMX tiles:
# 80 rows, measured 2026-12-05 on a Xeon with AMX (a q4 step 62.6-66.4 ms integer against 66.5-77.6 dense at 64
# rows, 74.8 / 80.2 against 77.6 / 75.0 at 72, 80.6 / 81.5 against 83.8 / 78.4 at 80, 89.7 / 94.9 against 79.7 /
# 75.6 at 96; 20 with the loop of the session before, 32 with the VNNI loop's prefetch). A fixed rule rather
# than a timing at start-up: the path changes a token's arithmetic, which should not depend on how busy the
# machine was then. Off by default: the two paths round differently, so with it a sequence's tokens depend on
# how many rows its step has (batching can change text).
DENSE_MIN_ROWS = {"amx_bf16": 80, "avx512_bf16": 32}  # most capable first: _bf16_crossover
# With --quant-dense-weights resident the dense path costs what an unquantized bfloat16 matmul costs (no
# dequantization per step), so it wins from fewer rows. Measured 2026-12-05 on the Xeon with AMX, decode steps
# (context 100..600) bfloat16 against q4's integer loop, two rounds: 38.8 / 38.0 against 18.9 / 18.3 ms at 8 rows,
# 62.8 / 61.0 against 53.2 / 53.4 at 32, 83.0 / 71.2 against 80.2 / 77.7 at 48, 87.3 / 83.8 against 101.2 / 101.2
# at 64. Without AMX it stays at 32: the kept weights make the dense path cheaper than the slices' at any batch,
# so their crossover is never too low; no real Zen 4 has measured a lower one (emulated on the Xeon,
# JITNEY_ISA=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, the integer loop led through 64 rows: 115-123 against
# 181-189 ms, where a real Zen 4's matmuls were even at 32 against the slices).
DENSE_MIN_ROWS_RESIDENT = {"amx_bf16": 48, "avx512_bf16": 32}
DENSE_SETTINGS = "off | auto | N"
# Rows of dequantized weights per slice: at most this many bytes (they stay in cache between the dequantization
# and the matmul that reads them); the default model's largest layer matmul (gate/up, 3.4 MiB in bfloat16) is
# one slice, its output head 14.
SLICE_BYTES = 4 << 20


def dense_min_rows(dtype: torch.dtype, setting: str = "off", resident: bool = False) -> int | None:
    """The batch (rows of x) from which a quantized matmul in this compute dtype takes the dense path; None:
    never. off: never (the integer loop's outputs are the same bits in any batch). auto: this CPU's crossover,
    only for bfloat16 on a CPU with native bfloat16 dot products (under float32 the integer loop is faster than
    float32's own matmul at every batch measured, Zen 4 and Zen 3; emulated bfloat16 matmuls are slower still),
    lower where the dequantized weights are kept (resident). N: from N rows, any dtype (0: never)."""
    if setting == "off":
        return None
    if setting == "auto":
        return _bf16_crossover(resident) if dtype == torch.bfloat16 else None
    if not setting.isdigit():
        raise ModelLoadError(f"--quant-dense-rows: want {DENSE_SETTINGS}, got {setting!r}")
    return int(setting) or None


def dense_weights_resident(setting: str, quantization: str) -> bool:
    """--quant-dense-weights: True for resident. Refuses an unknown value, and resident without quantization
    (nothing to keep: every matmul already reads unquantized weights)."""
    if setting not in DENSE_WEIGHTS:
        raise ModelLoadError(f"--quant-dense-weights: want {' or '.join(DENSE_WEIGHTS)}, got {setting!r}")
    if setting == "resident" and quantization == "none":
        raise ModelLoadError("--quant-dense-weights resident keeps a quantized model's dense-path weights; under "
                             "--quantization none every matmul reads unquantized weights already: leave it out")
    return setting == "resident"


@cache
def _bf16_crossover(resident: bool = False) -> int | None:
    """DENSE_MIN_ROWS (or DENSE_MIN_ROWS_RESIDENT) for this CPU's kind (the first of its entries, most capable
    first, that the CPU's flags have), None without native bfloat16."""
    from .precision import cpu_flags
    flags = cpu_flags()
    table = DENSE_MIN_ROWS_RESIDENT if resident else DENSE_MIN_ROWS
    return next((rows for flag, rows in table.items() if flag in flags), None)


def choose_path(m: int, dense_rows: int | None) -> str:
    """"dense" (dequantized slices through torch's matmul) or "integer" (the native loop) for m rows."""
    return "dense" if dense_rows is not None and m >= dense_rows else "integer"


_scratch = threading.local()


def _slice_buffer(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reusable buffer for dequantized slices (grown as needed, never shared between threads)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() * buf.element_size() < rows * k * dtype.itemsize:
        buf = _scratch.buf = torch.empty(rows * k * dtype.itemsize, dtype=torch.uint8)
    return buf[: rows * k * dtype.itemsize].view(dtype).view(rows, k)


def matmul(parts: list[QuantWeight], x: torch.Tensor, lib: ctypes.CDLL | None = None,
           path: str = "integer") -> torch.Tensor:
    """x [m, k] @ [W_1; W_2; ...]^T -> [m, sum n_i] in x's dtype: quantized weights stacked by rows (a fused
    q/k/v or gate/up, formats possibly mixed), on `path` ("integer", the default, or "dense")."""
    lib = lib or quant.library()  # looked up on the module: tests swap it
    k, n = parts[0].k, sum(p.n for p in parts)
    if lib is None:
        return F.linear(x, _torch_dequantized(parts, x.dtype))
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2 or x.stride(1) != 1 \
            or x.shape[1] != k or not x.is_cpu:
        raise ValueError(f"quantized matmul input: expected [m, {k}] float32 or bfloat16 with a contiguous "
                         f"last dimension on the CPU; got {tuple(x.shape)} {x.dtype} {x.device}")
    if path == "dense":
        return _dense(parts, x, lib)
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    col, bf16 = 0, int(x.dtype == torch.bfloat16)
    for p in parts:  # each into its own columns of out (row stride n)
        fmt, qs, d, m, row_scale = p.kernel_args
        lib.jitney_qmatmul(fmt, bf16, x.data_ptr(), x.stride(0), qs, d, m, row_scale,
                           out.data_ptr() + col * out.element_size(), n, x.shape[0], p.n, k)
        col += p.n
    return out


def _torch_dequantized(parts: list[QuantWeight], dtype: torch.dtype) -> torch.Tensor:
    """Every part's rows, stacked, dequantized by torch (where no native kernels load): the values the kernels
    give, rounded to dtype by torch."""
    return torch.cat([p.dequantize() for p in parts]).to(dtype)


def _dequantize_whole(parts: list[QuantWeight], out: torch.Tensor, lib: ctypes.CDLL) -> None:
    """Every part's rows, stacked, into out's first sum(n) rows; out holds a tile more (a part's last tile pads
    past its rows, and the next part writes over the padding)."""
    row = 0
    for p in parts:
        p.dequantize_tiles(0, p.qs.shape[0], out[row:], lib)
        row += p.n


def _dense(parts: list[QuantWeight], x: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """The dense path: the weights dequantized to x's dtype a slice of rows at a time into a buffer that stays in
    cache (SLICE_BYTES), each slice multiplied by torch's matmul into its columns of the output. The whole
    dequantized weight never exists at once."""
    m, k, dtype = x.shape[0], parts[0].k, x.dtype
    n = sum(p.n for p in parts)
    cap = max(8 * TILE, SLICE_BYTES // (k * dtype.itemsize) // TILE * TILE)  # rows per slice
    buf = _slice_buffer(min(cap, n + TILE) + TILE, k, dtype)  # + a tile: the last tile of a part pads past it
    if n <= cap:  # one slice: the matmul's output is the result
        _dequantize_whole(parts, buf, lib)
        return F.linear(x, buf[:n])
    out = torch.empty(m, n, dtype=dtype)
    filled, col = 0, 0  # rows in buf, and the output column its row 0 goes to
    for p in parts:
        tiles, t = p.qs.shape[0], 0
        while t < tiles:
            if cap - filled < TILE:
                torch.mm(x, buf[:filled].t(), out=out[:, col: col + filled])
                col, filled = col + filled, 0
            step = min(tiles - t, (cap - filled) // TILE)
            p.dequantize_tiles(t, step, buf[filled:], lib)
            filled += min(p.n, (t + step) * TILE) - t * TILE
            t += step
    torch.mm(x, buf[:filled].t(), out=out[:, col:])
    return out


class QuantLinear:
    """y = x @ W.T (+ b) for quantized parts stacked by rows (fused q/k/v or gate/up). Parts of one format are
    merged into one weight; a fusion of different formats (a GGUF may store v in Q8_0 beside Q4 q and k) runs
    the integer loop once per format, each into its own columns, or dequantizes all of them into one dense
    matmul."""

    def __init__(self, parts: list[QuantWeight], bias: torch.Tensor | None = None, dense_rows: int | None = None):
        merged: list[QuantWeight] = []
        for p in parts:
            if merged and merged[-1].fmt == p.fmt:
                merged[-1] = QuantWeight.cat([merged[-1], p])
            else:
                merged.append(p)
        self.parts, self.bias, self.dense_rows = merged, bias, dense_rows
        self.out_features, self.in_features = sum(p.n for p in merged), merged[0].k
        self.resident: Linear | None = None  # keep_dequantized: the dense path's weights, kept

    def keep_dequantized(self, dtype: torch.dtype, lib: ctypes.CDLL | None = None) -> int:
        """--quant-dense-weights resident: the weights dequantized once, now, each value as the dense path's slices
        hold it, and packed for oneDNN like an unquantized layer's; the dense path multiplies by them instead of
        dequantizing slices every step. Returns the bytes kept."""
        lib = lib or quant.library()
        rows = sum(p.n for p in self.parts)
        if lib is None:  # no native kernels: torch's own dequantization and rounding (the same values)
            w = _torch_dequantized(self.parts, dtype)
        else:
            w = torch.empty(rows + TILE, self.in_features, dtype=dtype)
            _dequantize_whole(self.parts, w, lib)
        self.resident = Linear(w[:rows].contiguous(), self.bias)
        return rows * self.in_features * dtype.itemsize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        path = choose_path(x.shape[0], self.dense_rows)
        if path == "dense" and self.resident is not None:
            return self.resident(x).view(*lead, self.out_features)
        y = matmul(self.parts, x, path=path)
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features)
