"""A quantized model's decoder stack in one native call (csrc/decoder.cpp): the per-layer kernels model.py calls
one at a time from Python, called in the same order with the same arguments from a loop in C.

At batch 1 nearly half a quantized step was the cost of starting kernels: SmolLM2's 30 layers make ~270 calls
(four matmuls, two residual-add norms, SiLU-and-multiply, rotary + K/V write and attention per layer), each with
its argument checks, its ctypes conversion and a tensor allocation, in caches the weights streaming past have
just flushed. Measured on AMD Zen 3 (2 cores), q4: the matmuls' C code took 4.5 ms of a 9.7 ms step; with one
call per step the step takes 4.9-5.5 ms (docs/quantization.md).

It takes a step only where the Python loop would call exactly these kernels: every layer matmul quantized
(no bias), on the integer loop for this many rows (qmatmul.choose_path), the native elementwise ops on, and
every row on the native row kernel (no tiled prompt chunks). Elsewhere model.py's loop runs as before. The
kernels' addresses are read from the loaded libraries at each call, so whichever loop they were built for (and
whichever a test swaps in) is the one that runs. JITNEY_FUSED=0 turns it off.
"""
from __future__ import annotations

import ctypes
import os
from functools import cache

import torch

from . import native, qmatmul, quant
from .attention import AttentionMetadata
from .kv_cache import cache_head_dim
from .qmatmul import QuantLinear

SOURCE = native.SOURCE.parent / "decoder.cpp"
MAX_PARTS = 3   # weight formats in one fused matmul (decoder.cpp's MAX_PARTS)
PART_SLOTS = 6  # per part: format, qs, d, m, row_scale, rows
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _declare(lib: ctypes.CDLL) -> None:
    lib.jitney_decoder_forward.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_float, ctypes.c_float, _ptr, _ptr,
                                           _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr]
    lib.jitney_decoder_forward.restype = ctypes.c_int
    lib.jitney_decoder_layer_slots.argtypes, lib.jitney_decoder_layer_slots.restype = [], ctypes.c_int


@cache
def library() -> ctypes.CDLL | None:
    """The loop's library, or None; JITNEY_FUSED=0 turns it off, so every step takes the Python loop (to
    compare the two)."""
    if os.environ.get("JITNEY_FUSED", "1") == "0":
        return None
    return native.load_source(SOURCE, _declare, "quantized steps call their kernels one by one from Python")


def _address(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def _linear_slots(layer: QuantLinear) -> list[int]:
    slots = [len(layer.parts)]
    for p in layer.parts:
        fmt, qs, d, m, row_scale = p.kernel_args
        slots += [fmt, qs, d or 0, m or 0, row_scale or 0, p.n]
    return slots + [0] * (PART_SLOTS * (MAX_PARTS - len(layer.parts)))


class FusedDecoder:
    """The decoder stack of one LlamaModel, for jitney_decoder_forward: its layers' weight addresses in a table
    built once (the model holds the weights for as long as it lives)."""

    def __init__(self, model, lib: ctypes.CDLL):
        cfg = model.cfg
        self.lib, self.model = lib, model
        rows = [[layer.input_norm.data_ptr(), layer.post_attn_norm.data_ptr()]
                + sum((_linear_slots(getattr(layer, n)) for n in ("qkv", "o", "gate_up", "down")), [])
                for layer in model.layers]
        assert all(len(r) == lib.jitney_decoder_layer_slots() for r in rows)
        self.tables = torch.tensor(rows, dtype=torch.int64)
        self.dense_rows = model.layers[0].qkv.dense_rows
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim ** -0.5
        self._caches: tuple[int, torch.Tensor] | None = None  # (the cache's address, each layer's address)

    @classmethod
    def build(cls, model) -> FusedDecoder | None:
        """For a model whose every layer matmul is quantized, without bias, in at most MAX_PARTS formats, on the
        CPU, where the native kernels load; else None."""
        linears = model.layer_matmuls()
        if model.device != "cpu" or not model.ops.native or not all(
                isinstance(x, QuantLinear) and x.bias is None and len(x.parts) <= MAX_PARTS
                and x.dense_rows == linears[0].dense_rows for x in linears):
            return None
        lib = library() if native.library() is not None and quant.library() is not None else None
        return None if lib is None else cls(model, lib)

    def runs(self, meta: AttentionMetadata, rows: int) -> bool:
        """Whether the Python loop would take exactly this path for this step."""
        return (self.model.ops.native and meta.native is not None and meta.native.chunks is None
                and qmatmul.choose_path(rows, self.dense_rows) == "integer")

    def _layer_caches(self, kv_cache: torch.Tensor) -> torch.Tensor:
        if self._caches is None or self._caches[0] != kv_cache.data_ptr():
            step = kv_cache.stride(0) * kv_cache.element_size()
            self._caches = (kv_cache.data_ptr(), torch.tensor([kv_cache.data_ptr() + i * step
                                                               for i in range(kv_cache.shape[0])], dtype=torch.int64))
        return self._caches[1]

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """The stack over the embedded rows x [T, hidden] (updated in place, as the Python loop does): returns
        the last layer's output normed by the final norm."""
        cfg, rows = self.model.cfg, meta.native
        t, hidden = x.shape
        _, _, kv_heads, num_blocks, block_size, _ = kv_cache.shape
        native._check(x.dtype in native.KERNEL_DTYPES and x.is_contiguous() and hidden == cfg.hidden_size
                      and cos.dtype == signed_sin.dtype == x.dtype and cos.is_contiguous()
                      and signed_sin.is_contiguous() and cos.numel() == signed_sin.numel() == t * cfg.head_dim
                      and kv_cache.is_contiguous() and kv_cache.dtype in native.KV_KINDS
                      and kv_cache.shape[0] == len(self.model.layers) and kv_heads == cfg.num_key_value_heads
                      and cache_head_dim(kv_cache) == cfg.head_dim
                      and (x.dtype == kv_cache.dtype or x.dtype == torch.float32 or kv_cache.dtype == torch.int8),
                      "x [T, hidden] contiguous, cos and sine [T, head_dim] of its dtype, the model's whole cache",
                      x, cos, signed_sin, kv_cache)
        slots, tables, lens = meta.slot_mapping, rows.block_tables, rows.context_lens
        native._check(slots.dtype == torch.int64 and slots.is_contiguous() and slots.shape == (t,)
                      and tables.dtype == lens.dtype == torch.int32 and tables.stride(1) == 1
                      and lens.is_contiguous() and tables.shape[0] == lens.shape[0] == t,
                      "one int64 slot, one int32 table row and context length per row", slots, tables, lens)
        nat, qlib = native.library(), quant.library()
        kernels = torch.tensor([_address(qlib, "jitney_qmatmul"), _address(nat, "jitney_add_rms_norm"),
                                _address(nat, "jitney_silu_mul"), _address(nat, "jitney_rope_write_kv"),
                                _address(nat, "jitney_paged_attention")], dtype=torch.int64)
        shape = torch.tensor([hidden, cfg.intermediate_size, cfg.num_attention_heads, kv_heads, cfg.head_dim,
                              num_blocks, block_size, native.KV_KINDS[kv_cache.dtype], int(x.dtype == torch.bfloat16),
                              len(self.model.layers)], dtype=torch.int64)
        h = torch.empty_like(x)
        failed = self.lib.jitney_decoder_forward(
            kernels.data_ptr(), shape.data_ptr(), self.tables.data_ptr(), self._layer_caches(kv_cache).data_ptr(),
            self.model.norm.data_ptr(), self.eps, self.scale, x.data_ptr(), h.data_ptr(), t, cos.data_ptr(),
            signed_sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr())
        if failed:
            raise MemoryError(f"the decoder stack's scratch buffers for {t} rows could not be allocated")
        return h
