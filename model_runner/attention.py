"""Paged attention in plain PyTorch: write this step's K/V into cache slots, read each sequence's K/V back
through its block table.

The cache of one layer is a flat array of slots [num_blocks * block_size, kv_heads, head_dim]; a token's slot
is block_table[pos // block_size] * block_size + pos % block_size. Decoding sequences (one query each) are
attended together in one padded batch; prefill chunks (many queries) one sequence at a time, causally.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int          # first query row of the chunk in the flat batch
    end: int            # one past the last query row
    context_len: int    # tokens the sequence holds after this step (cached prefix + this chunk)
    slots: torch.Tensor | None   # [context_len] cache slots to read; None when the chunk is the whole context
    mask: torch.Tensor | None    # [n, context_len] causal mask when the chunk follows a cached prefix


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor            # [T] where each new token's K/V goes
    num_decodes: int                      # the first num_decodes rows are single-token decodes
    decode_slots: torch.Tensor | None     # [D, max_context] slots of each decode's context (padded)
    decode_mask: torch.Tensor | None      # [D, 1, 1, max_context] True where a key is real
    prefills: list[PrefillChunk]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] for this step's tokens -> attention output [T, H, D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    n = meta.num_decodes
    if n:
        # [D, ctx, KVH, Dh] gathered through the block tables, heads first for SDPA.
        kd = k_cache[meta.decode_slots].transpose(1, 2)
        vd = v_cache[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:n].unsqueeze(2), kd, vd, attn_mask=meta.decode_mask,
                                           scale=scale, enable_gqa=True)
        out[:n] = o.squeeze(2)
    for c in meta.prefills:
        qc = q[c.start:c.end].transpose(0, 1).unsqueeze(0)
        if c.slots is None:  # a fresh prompt: its keys are exactly this chunk's, plain causal attention
            kc, vc = k[c.start:c.end], v[c.start:c.end]
        else:
            kc, vc = k_cache[c.slots], v_cache[c.slots]
        o = F.scaled_dot_product_attention(qc, kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0),
                                           attn_mask=c.mask, is_causal=c.mask is None, scale=scale,
                                           enable_gqa=True)
        out[c.start:c.end] = o[0].transpose(0, 1)
    return out
