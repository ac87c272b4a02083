"""A linear layer whose weight is packed once, at load, into oneDNN's blocked layout on the CPU.

F.linear on the CPU re-lays the weight out for the matmul kernel on every call; packing once (what
torch.compile's "freezing" does) makes small-batch decode matmuls 1.5-3x faster here. oneDNN's packed
linear is a private torch op, so a load-time self-check decides whether to use it, else plain F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _packed_linear_works(dtype: torch.dtype) -> bool:
    try:
        w, x = torch.randn(8, 16, dtype=dtype), torch.randn(3, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return torch.allclose(out.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)
    except (RuntimeError, AttributeError):
        return False


_PACKABLE: dict[torch.dtype, bool] = {}


class Linear:
    """y = x @ W.T (+ b). Holds the weight packed when the backend allows, plain otherwise."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if pack and weight.device.type == "cpu" and _PACKABLE.setdefault(weight.dtype, _packed_linear_works(weight.dtype)):
            self.weight, self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 64), True
        else:
            self.weight, self.packed = weight, False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
