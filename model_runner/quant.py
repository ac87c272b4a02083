"""Quantized weights (`--quantization q4|int8`) and their matmul.

  q4    GGUF Q4_0 / Q4_1 / Q8_0 tensors kept as the file stores them: blocks of 32 values, each block with an
        fp16 scale d (and, for Q4_1, an fp16 min m); w = d (q - 8), d q + m, d q. jitney multiplies by exactly
        the numbers llama.cpp multiplies by. Only GGUF files hold them (gguf.stored_blocks reads them).
  int8  any model: each output row (channel) of a matmul weight as int8 q in -127..127 and a float32 scale
        s = max|w| / 127, quantized at load (symmetric, weight-only); w ~ s q.

The matmul (model_runner/qmatmul.py) has two paths, chosen by the rows of x (the tokens of a step) against
--quant-dense-rows (qmatmul.choose_path; off by default: the integer loop always):

  integer  (the default; with --quant-dense-rows, small batches) csrc/qmatmul.cpp quantizes the activations
           of each step to 16-bit integers per block of 32 (a float32 scale per block, two 8-bit digits) and
           computes each block's dot product in integers (AVX2 vpmaddubsw, AVX-512 VNNI vpdpbusd): the way
           llama.cpp computes with these formats, but with 16-bit activations instead of 8, so that the result is
           the float model's to the compute dtype's precision (the kernel's header says why). At batch 1 it reads
           a quarter of bfloat16's bytes, which is what bounds the step.
  dense    (--quant-dense-rows auto: bfloat16 from DENSE_MIN_ROWS rows, on CPUs with native bfloat16 dot
           products; N: from N rows) the weights are dequantized a slice at a time (csrc/qmatmul.cpp's
           jitney_dequantize: each value dequantize()'s, rounded to bfloat16 as torch rounds) into a buffer that
           stays in cache, and each slice goes through torch's matmul (oneDNN: AVX512-BF16, AMX), whose bfloat16
           dot products outrun the integer loop once the step is compute-bound. The weights it multiplies are the
           unquantized bfloat16 model's, bit for bit; the full dequantized weight never exists at once. With
           --quant-dense-weights resident it does: dequantized once at load and kept, packed for oneDNN as the
           unquantized model packs its own, so a dense step is that model's step, bit for bit and as fast, for
           its weights' bytes again in memory (auto's crossover then falls to DENSE_MIN_ROWS_RESIDENT).

For the integer loop the rows are repacked at load into tiles of 8 rows interleaved by 4 bytes (the kernel's
header says why); the values, scales and mins are untouched, and `to_gguf` gives the file's bytes back (tests
check both round trips bit for bit). The dense path reads the same tiles.

Where the native kernels cannot be built, the matmul dequantizes the weight to the compute dtype on every call
(correct, slow; the start-up warning says so).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import torch

from . import native
from .errors import ModelLoadError

QK = 32     # values per block (GGUF's, and the activations')
TILE = 8    # rows per tile: the kernel's 8 lanes
MODES = ("none", "int8", "q4")
DENSE_WEIGHTS = ("slices", "resident")  # --quant-dense-weights (qmatmul.py)
# Format -> (kernel id, GGUF bytes per block, offset of the quants in a block, bytes per tile-block when packed)
FORMATS = {"q4_0": (0, 18, 2, 128), "q4_1": (1, 20, 4, 128), "q8_0": (2, 34, 2, 256), "int8": (3, None, None, 256)}
SOURCE = Path(__file__).parent / "csrc" / "qmatmul.cpp"
# The Hugging Face names of the weights a matmul reads (the embedding too: it is the tied output head).
MATMUL_SUFFIXES = tuple(f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj", "embed_tokens", "lm_head"))


def is_matmul_weight(name: str) -> bool:
    return name.endswith(MATMUL_SUFFIXES)


@dataclass
class QuantWeight:
    """A quantized [n, k] weight in the kernel's tiles: qs [tiles, k / 32, 128 or 256] bytes, d and m
    [tiles, k / 32, 8] fp16 (GGUF formats; m only for Q4_1), row_scale [tiles * 8] float32 (int8)."""
    fmt: str
    n: int
    k: int
    qs: torch.Tensor
    d: torch.Tensor | None = None
    m: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @property
    def nbytes(self) -> int:
        """Bytes held, tile padding included (what a step reads)."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m, self.row_scale) if t is not None)

    # --- from and to the file's blocks, and int8 from floats --------------------------------------------------

    @classmethod
    def from_gguf(cls, fmt: str, raw: torch.Tensor, k: int) -> "QuantWeight":
        """From GGUF rows raw [n, k / 32 * block bytes] (uint8), as the file stores them."""
        _, block_bytes, off, _ = FORMATS[fmt]
        n, nb = raw.shape[0], k // QK
        if k % QK or raw.shape[1] != nb * block_bytes:
            raise ModelLoadError(f"a {fmt} tensor of {k} columns should have {nb * block_bytes} bytes a row, "
                                 f"not {raw.shape[1]}")
        blocks = _pad_rows(raw.view(torch.uint8), n).view(-1, nb, block_bytes)
        d = _tiled(blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1))
        m = _tiled(blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)) if fmt == "q4_1" else None
        q = blocks[..., off:]
        if fmt == "q8_0":
            return cls(fmt, n, k, _interleave(q), d, m)
        nibbles = torch.cat([q & 15, q >> 4], dim=-1)  # GGUF: byte i holds values i (low) and i + 16 (high)
        return cls(fmt, n, k, _pack_nibbles(_interleave(nibbles)), d, m)

    def to_gguf(self) -> torch.Tensor:
        """The file's rows again: [n, k / 32 * block bytes] uint8."""
        q = self.quants()
        if self.fmt == "int8":
            raise ValueError("int8 weights come from no file")
        nb = self.k // QK
        d = _untiled(self.d)[: self.n].unsqueeze(-1).view(torch.uint8)
        parts = [d] + ([_untiled(self.m)[: self.n].unsqueeze(-1).view(torch.uint8)] if self.fmt == "q4_1" else [])
        q = q.view(self.n, nb, QK)
        if self.fmt == "q8_0":
            parts.append(q.view(torch.uint8))
        else:
            parts.append(q[..., :16] | (q[..., 16:] << 4))
        return torch.cat(parts, dim=-1).reshape(self.n, -1)

    @classmethod
    def int8(cls, w: torch.Tensor) -> "QuantWeight":
        """Per-output-row symmetric int8 of a float weight [n, k]: s = max|w| / 127, q = round(w / s)."""
        n, k = w.shape
        if k % QK:
            raise ModelLoadError(f"--quantization int8 needs matmul inputs in multiples of {QK}; this model has "
                                 f"a weight of {k} columns: use --quantization none")
        w = w.float()
        scale = w.abs().amax(dim=1) / 127
        q = torch.where(scale[:, None] > 0, w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None], 0.0)
        q = q.round().clamp(-127, 127).to(torch.int8)
        row_scale = torch.zeros(-(-n // TILE) * TILE)
        row_scale[:n] = scale
        return cls("int8", n, k, _interleave(_pad_rows(q, n).view(-1, k // QK, QK).view(torch.uint8)),
                   row_scale=row_scale)

    @classmethod
    def cat(cls, parts: list["QuantWeight"]) -> "QuantWeight":
        """Rows of weights of one format stacked (fused q/k/v, gate/up): the values move, none changes."""
        fmt, k = parts[0].fmt, parts[0].k
        assert all(p.fmt == fmt and p.k == k for p in parts)
        if fmt == "int8":
            q = torch.cat([p.quants() for p in parts])
            n = q.shape[0]
            out = cls("int8", n, k, _interleave(_pad_rows(q.view(torch.uint8), n).view(-1, k // QK, QK)))
            out.row_scale = torch.zeros(-(-n // TILE) * TILE)
            out.row_scale[:n] = torch.cat([p.row_scale[: p.n] for p in parts])
            return out
        return cls.from_gguf(fmt, torch.cat([p.to_gguf() for p in parts]), k)

    # --- values -----------------------------------------------------------------------------------------------

    def quants(self, tiles: torch.Tensor | None = None) -> torch.Tensor:
        """The integer values row by row ([rows, k]: 0..15 for Q4, int8 otherwise), of all rows or of the
        given tiles' (8 rows each)."""
        qs = self.qs if tiles is None else self.qs[tiles]
        t, nb = qs.shape[0], self.k // QK
        if self.fmt in ("q4_0", "q4_1"):
            packed = qs.view(t, nb, 4, 32)
            qs = torch.cat([packed & 15, packed >> 4], dim=2)  # groups j and j + 4 share a byte
        # [t, nb, 8 groups, 8 rows, 4] -> [t, 8 rows, nb, 8 groups, 4] = [rows, k]
        q = qs.reshape(t, nb, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(t * TILE, self.k)
        q = q if tiles is not None else q[: self.n]
        return q.view(torch.int8) if self.fmt in ("q8_0", "int8") else q

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 rows [len(rows), k] (the embedding lookup), computed as gguf.quants does, bit for bit."""
        tiles, lane = rows // TILE, rows % TILE
        pick = torch.arange(len(rows)) * TILE + lane
        q = self.quants(tiles)[pick].view(len(rows), self.k // QK, QK)
        if self.fmt == "int8":
            return q.float().view(len(rows), self.k) * self.row_scale[rows, None]
        d = self.d[tiles, :, lane].float().unsqueeze(-1)
        if self.fmt == "q4_0":
            w = d * (q.to(torch.int8) - 8).float()
        elif self.fmt == "q4_1":
            w = d * q.float() + self.m[tiles, :, lane].float().unsqueeze(-1)
        else:
            w = q.float() * d
        return w.view(len(rows), self.k)

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(torch.arange(self.n))

    @cached_property
    def kernel_args(self) -> tuple:
        """What the native functions take for this weight: (format id, qs, d, m, row_scale) as pointers."""
        ptr = lambda t: None if t is None else t.data_ptr()
        return FORMATS[self.fmt][0], self.qs.data_ptr(), ptr(self.d), ptr(self.m), ptr(self.row_scale)

    def dequantize_tiles(self, tile0: int, tiles: int, out: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
        """Rows tile0 * 8 .. (tile0 + tiles) * 8 - 1 into out (float32 or bfloat16, [tiles * 8, k], row-contiguous):
        each value dequantize()'s, rounded to out's dtype (padded rows: zeros). Native kernels only."""
        lib = lib or library()
        if out.dtype not in (torch.float32, torch.bfloat16) or out.shape[0] < tiles * TILE or out.shape[1] != self.k \
                or out.stride(1) != 1 or not 0 <= tile0 <= tile0 + tiles <= self.qs.shape[0]:
            raise ValueError(f"dequantize_tiles: {tiles} tiles from {tile0} of {self.qs.shape[0]} into "
                             f"{tuple(out.shape)} {out.dtype}")
        fmt, qs, d, m, row_scale = self.kernel_args
        lib.jitney_dequantize(fmt, int(out.dtype == torch.bfloat16), qs, d, m, row_scale, tile0, tiles, self.k,
                              out.data_ptr(), out.stride(0))


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Rows padded with zeros to whole tiles (zero scales: padded rows compute to 0 and are never stored)."""
    pad = -n % TILE
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def _tiled(per_block: torch.Tensor) -> torch.Tensor:
    """[rows, nb] -> [tiles, nb, 8]: one tile's 8 row scales of a block side by side (one vector load)."""
    rows, nb = per_block.shape
    return per_block.view(rows // TILE, TILE, nb).transpose(1, 2).contiguous()


def _untiled(tiled: torch.Tensor) -> torch.Tensor:
    t, nb, _ = tiled.shape
    return tiled.transpose(1, 2).reshape(t * TILE, nb)


def _interleave(q: torch.Tensor) -> torch.Tensor:
    """Values [rows, nb, 32] (bytes) -> [tiles, nb, 256]: group j of a tile-block holds values 4j..4j+3 of its
    8 rows, row after row."""
    rows, nb, _ = q.shape
    return q.reshape(rows // TILE, TILE, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(rows // TILE, nb, 256).contiguous()


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[tiles, nb, 256] values 0..15 -> [tiles, nb, 128]: group j in the low nibbles, group j + 4 in the high."""
    t, nb, _ = q.shape
    g = q.view(t, nb, 8, 32)
    return (g[:, :, :4] | (g[:, :, 4:] << 4)).reshape(t, nb, 128).contiguous()


# --- the kernel library ---------------------------------------------------------------------------------------

def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.jitney_qmatmul.argtypes = [ctypes.c_int, ctypes.c_int, p, i64, p, p, p, p, p, i64, i64, i64, i64]
    lib.jitney_qmatmul.restype = None
    lib.jitney_qmatmul_isa.argtypes, lib.jitney_qmatmul_isa.restype = [], ctypes.c_char_p
    lib.jitney_qmatmul_set_amx.argtypes, lib.jitney_qmatmul_set_amx.restype = [ctypes.c_int], ctypes.c_int
    lib.jitney_qmatmul_quantize_row.argtypes = [ctypes.c_int, ctypes.c_int, p, i64, p, p, p, p]
    lib.jitney_qmatmul_quantize_row.restype = None
    lib.jitney_dequantize.argtypes = [ctypes.c_int, ctypes.c_int, p, p, p, p, i64, i64, i64, p, i64]
    lib.jitney_dequantize.restype = None


@cache
def library() -> ctypes.CDLL | None:
    return native.load_source(SOURCE, _declare, "quantized matmuls dequantize their weights on every call (slow)")


def isa() -> str:
    """The loop the quantized matmul runs: avx512-vnni, avx2, portable, or torch (no native kernels)."""
    lib = library()
    return "torch (dequantized per call)" if lib is None else lib.jitney_qmatmul_isa().decode()


# --- a model's weights -----------------------------------------------------------------------------------------

def quantize_int8(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantWeight]:
    """--quantization int8: every matmul weight (embedding included) to per-row int8, the rest untouched."""
    return {name: QuantWeight.int8(w) if is_matmul_weight(name) and w.dim() == 2 else w
            for name, w in weights.items()}


def save(weights: dict[str, QuantWeight], path: Path) -> None:
    """Quantized weights to a safetensors file (tiles as packed: a later load skips the repacking)."""
    from safetensors.torch import save_file
    tensors, meta = {}, {}
    for name, w in weights.items():
        meta[name] = f"{w.fmt},{w.n},{w.k}"
        for part in ("qs", "d", "m", "row_scale"):
            if (t := getattr(w, part)) is not None:
                tensors[f"{name}:{part}"] = t
    save_file(tensors, path, metadata=meta)


def load(path: Path) -> dict[str, QuantWeight]:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        part = lambda name, p: f.get_tensor(f"{name}:{p}") if f"{name}:{p}" in keys else None
        out = {}
        for name, spec in meta.items():
            fmt, n, k = spec.split(",")
            out[name] = QuantWeight(fmt, int(n), int(k), part(name, "qs"), part(name, "d"), part(name, "m"),
                                    part(name, "row_scale"))
    return out


def bytes_by_format(weights: dict, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of a model's weights per format: float tensors at the compute dtype's size, quantized ones as held."""
    out: dict[str, int] = {}
    for w in weights.values():
        fmt, n = (w.fmt, w.nbytes) if isinstance(w, QuantWeight) else (str(dtype).removeprefix("torch."),
                                                                         w.numel() * dtype.itemsize)
        out[fmt] = out.get(fmt, 0) + n
    return out


def describe_bytes(by_format: dict[str, int]) -> str:
    total = sum(by_format.values())
    parts = ", ".join(f"{fmt} {n / 2**20:.1f}" for fmt, n in sorted(by_format.items(), key=lambda kv: -kv[1]))
    return f"weights {total / 2**20:.1f} MiB ({parts})"
