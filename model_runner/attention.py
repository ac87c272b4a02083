"""Paged attention: write this step's K/V into cache slots (rotate_and_store), read each sequence's K/V back
through its block table (paged_attention).

One layer's cache is [2 (K, V), kv_heads, num_blocks, block_size, head_dim]. A token at position p of a
sequence lives in block block_table[p // block_size] at offset p % block_size; its "slot" is
block * block_size + offset.

On the CPU every query row of a step, decode or prompt chunk, goes to the native kernel (native.py,
csrc/paged_attention.cpp) where it builds: a row at position p attends to its sequence's first p + 1 cached
tokens, read in place through the block table, once (its AVX2 loop takes a prompt chunk's rows up to eight at a
time, each row's arithmetic that of the row alone, so float32 stays exactly batch-invariant). Where the CPU has AVX512-BF16 and the step is bfloat16,
prompt chunks go instead to the tiled kernel (csrc/prefill_attention.cpp: row tiles against packed key and
value tiles, as matrix products, on the AMX tile units where the CPU has them), which attends a 512-token
prompt about twice as fast (3.6x on an Intel Xeon with AMX). What that buys per model step is measured by
`python -m benchmarks.kernels` (the kernels table in docs/README.md: a batch-96 decode step at contexts of
300..700 tokens is 2.6x faster than the PyTorch path, a 512-token prompt 1.5x).

The PyTorch path (no compiler, CUDA, JITNEY_NATIVE=0) gives the same results up to rounding. Decodes run
in groups of similar context length, each group as a gather of its blocks, two batched matmuls and a masked
softmax. Heads come before blocks in the cache so that gathering a batch of block tables (one index_select
of whole rows) yields [2, kv_heads, seqs, context, head_dim] already laid out for a batched matmul (no
transposing copy, which costs more than the attention itself at these sizes). SDPA's CPU kernels are tuned
for long queries and are several times slower for single-token ones, and grouping keeps the padding (gathered
and multiplied for nothing) small when short and long contexts share a step (measured when this path was
written: 128 contexts of 48..768 tokens, 23 ms a layer as one padded group, 4.5 ms as eight). Prefill chunks
(many queries) go one sequence at a time through SDPA, causally.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native
from .int8_kv import as_stored, dequantize_rows, quantize_rows
from .rope import apply_rotary


@dataclass
class PrefillChunk:
    start: int                        # first query row of the chunk in the flat batch
    end: int                          # one past the last query row
    context_len: int                  # tokens the sequence holds after this step (cached prefix + this chunk)
    rows: torch.Tensor | None         # (K/V, head, block) rows to read, as DecodeGroup.rows; None when the chunk
                                      # is the whole context (a fresh prompt)
    mask: torch.Tensor | None         # [n, context_len] causal mask when the chunk follows a cached prefix


@dataclass
class DecodeGroup:
    start: int                  # rows start .. end-1 of the flat batch: single-token queries
    end: int
    rows: torch.Tensor          # [2 * kv_heads * rows * max_blocks] rows of the layer's cache viewed as
                                # [2 * kv_heads * blocks, block_size * head_dim]: each (K/V, head, block) of the
                                # padded block tables, so one gather fetches both K and V
    bias: torch.Tensor          # [1, rows, 1, max_blocks * block_size] 0 for real keys, -inf for padding


@dataclass
class NativeAttention:
    """Every query row of the step, for the native kernel, which reads each row's blocks in place: no grouping,
    no padding, no gathered copy, no mask (a row attends to the first context_lens[row] tokens)."""
    block_tables: torch.Tensor  # [T, widest table] int32: each row's sequence's table, padded
    context_lens: torch.Tensor  # [T] int32: each row's position + 1
    # Set where the tiled prompt kernel runs (native.prefill_supported): the step's multi-token chunks, (first
    # row, rows, first position) [C, 3] int32, for it; the single-token rows before them (decodes: one query per
    # sequence, nothing to tile) for the row kernel.
    chunks: torch.Tensor | None = None
    decode_rows: int = 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] where each new token's K/V goes
    decodes: list[DecodeGroup]      # single-token queries come first in the batch, grouped by context length
    prefills: list[PrefillChunk]
    native: NativeAttention | None = None  # set instead of decodes and prefills: the native kernel runs all


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
    """cache [KVH, blocks, bs, D] <- x [T, KVH, D] at the given slots (rounded to the cache's dtype; into an
    int8 cache, whose rows are D + 4 bytes, quantized: int8_kv.py)."""
    kvh, _, _, width = cache.shape
    rows = quantize_rows(x) if cache.dtype == torch.int8 else x.to(cache.dtype)
    cache.view(kvh, -1, width).index_copy_(1, slot_mapping, rows.transpose(0, 1))


def rotate_and_store(qkv: torch.Tensor, heads: int, cos: torch.Tensor, signed_sin: torch.Tensor,
                     kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
    """A layer's step before attention: the fused projection qkv [T, H + 2 KVH, D] has its query and key heads
    rotated (rope.apply_rotary) and its keys and values written into the layer's cache at the step's slots.
    Returns q [T, H, D], k, v [T, KVH, D]. On the native path in one pass, in place (native.rope_write_kv)."""
    kvh = kv_cache.shape[1]
    if meta.native is not None:
        native.rope_write_kv(qkv, heads, cos, signed_sin, kv_cache, meta.slot_mapping)
        return qkv[:, :heads], qkv[:, heads: heads + kvh], qkv[:, heads + kvh:]
    qk = apply_rotary(qkv[:, : heads + kvh], cos, signed_sin)  # q and k share positions: one rotation for both
    q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kvh:]
    write_kv(kv_cache[0], meta.slot_mapping, k)
    write_kv(kv_cache[1], meta.slot_mapping, v)
    return q, k, v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] for this step's tokens, already in kv_cache [2, KVH, blocks, block_size, D]
    (the layer's; rotate_and_store). Returns the attention output [T, H, D]."""
    if meta.native is not None:
        rows = meta.native
        if rows.chunks is None:  # decodes only, or no tiled kernel here
            return native.paged_attention(q, kv_cache, rows.block_tables, rows.context_lens, scale)
        out = torch.empty(q.shape, dtype=q.dtype)
        d = rows.decode_rows
        if d:
            native.paged_attention(q[:d], kv_cache, rows.block_tables[:d], rows.context_lens[:d], scale, out[:d])
        native.prefill_attention(q, kv_cache, rows.block_tables, rows.chunks, scale, out)
        return out
    if len(meta.decodes) == 1 and not meta.prefills:  # a pure decode step: no output to assemble
        return decode_attention(q, kv_cache, meta.decodes[0], scale)
    out = torch.empty_like(q)
    for g in meta.decodes:
        out[g.start:g.end] = decode_attention(q[g.start:g.end], kv_cache, g, scale)
    for c in meta.prefills:
        qc = q[c.start:c.end].transpose(0, 1).unsqueeze(0)
        if c.rows is None:  # a fresh prompt: its keys are exactly this chunk's, as the cache holds them
            kc, vc = (as_stored(x[c.start:c.end].transpose(0, 1), kv_cache.dtype).to(q.dtype) for x in (k, v))
        else:
            kc, vc = gather_kv(kv_cache, c.rows)[:, :, : c.context_len].to(q.dtype)
        o = F.scaled_dot_product_attention(qc, kc.unsqueeze(0), vc.unsqueeze(0), attn_mask=c.mask,
                                           is_causal=c.mask is None, scale=scale, enable_gqa=True)
        out[c.start:c.end] = o[0].transpose(0, 1)
    return out


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, g: DecodeGroup, scale: float) -> torch.Tensor:
    """One group of single-token queries q [rows, H, D] against their sequences' cached K/V."""
    n, kvh, d = q.shape[0], kv_cache.shape[1], q.shape[-1]
    kv = gather_kv(kv_cache, g.rows).view(2, kvh, n, -1, d).to(q.dtype)  # [2, KVH, rows, ctx, Dh]
    qd = q.view(n, kvh, -1, d).transpose(0, 1)                     # [KVH, rows, q heads per kv head, Dh]
    scores = torch.add(g.bias, torch.matmul(qd, kv[0].transpose(-1, -2)), alpha=scale)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)              # float32 softmax, as the reference does
    return torch.matmul(probs, kv[1]).transpose(0, 1).reshape(n, -1, d)


def gather_kv(kv_cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[2, KVH, tokens, Dh] from a layer's cache [2, KVH, blocks, block_size, Dh], given (K/V, head, block) rows
    (from an int8 cache, whose rows are Dh + 4 bytes: widened and scaled, float32).

    Gathering whole rows of a 2-D view is a plain row copy: twice as fast as index_select along an inner dim
    of the 5-D cache, and one call fetches K and V together."""
    _, kvh, blocks, _, width = kv_cache.shape
    rows = kv_cache.view(2 * kvh * blocks, -1).index_select(0, rows).view(2, kvh, -1, width)
    return dequantize_rows(rows) if kv_cache.dtype == torch.int8 else rows
