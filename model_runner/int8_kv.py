"""The int8 KV cache's rows in PyTorch (the layout is model_runner/kv_cache.py's): quantizing as written,
widening as read. The native kernels (csrc/paged_attention.cpp) do the same in their own loops; a row written
by either is bit for bit the same (the same float32 operations: an exact absmax, one division by 127, one
reciprocal, a multiplication per element, rounding half to even)."""
from __future__ import annotations

import torch

from .kv_cache import SCALE_BYTES


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (float32 or bfloat16) -> int8 [..., D + 4]: each row's values round(x * (1 / scale)), symmetric in
    [-127, 127], then its float32 scale absmax / 127 (0 for a row of zeros, whose values are then 0) as 4
    bytes. Non-finite input gives rows of no meaning (as it would in any cache)."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, torch.ones_like(scale) / scale, torch.zeros_like(scale))
    q = (xf * inv).round_().clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], -1)


def row_scales(rows: torch.Tensor) -> torch.Tensor:
    """The float32 scales [..., 1] of int8 rows [..., D + 4]."""
    return rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """int8 rows [..., D + 4] -> float32 [..., D]: each value times its row's scale."""
    return rows[..., :-SCALE_BYTES].float() * row_scales(rows)


def as_stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] as a cache of this dtype gives it back: rounded to it, or for int8 quantized and widened
    again (float32)."""
    return dequantize_rows(quantize_rows(x)) if dtype == torch.int8 else x.to(dtype)
