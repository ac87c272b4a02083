"""The paged KV cache's memory: how many blocks fit a budget, and the one preallocated tensor that holds them.

A sequence's token at position p lives in block block_table[p // block_size], offset p % block_size. Which
block holds what is decided by the batcher's KVCacheManager; the runner only reads the tables it is given.

An 8-bit cache (`--kv-cache-dtype int8`) stores each cached row (one token's key or value for one kv head) as
head_dim int8 values followed by the row's float32 scale, in the same tensor: int8 [..., head_dim + 4], whose
last four elements are the scale's bytes (absmax / 127, symmetric: value = q * scale; the quantizing is
model_runner/int8_kv.py's and csrc/paged_attention.cpp's write_row, to the same bits). Why the scale sits beside
its row rather than in a tensor of its own:
- one owner, as before: a block is one contiguous run of bytes whatever the dtype, so anything that moves,
  copies, gathers or forks blocks (the PyTorch path's row gathers, a future swap) carries the scales with the
  values for free, and there is no second tensor to keep in step;
- the row and its scale arrive together: the kernel reads them in the same pass over the block (the scale is
  in the row's own cache line or the next), so scales cost no extra stream of misses, only their 4 bytes per
  row (6 % at head_dim 64, 3 % at 128), which the block budget below counts;
- per token, not per block: a token's scale is final when it is written (no re-quantizing a block when a later
  token raises its maximum), so a block's bytes never change after its tokens are written, which the prefix
  cache and batch invariance rely on.
The price is rows of 68 bytes at head_dim 64, not a multiple of a cache line: the kernels load them unaligned
and collect each group of keys' scales with one gather instruction.
"""
from __future__ import annotations

import torch

from .config import ModelConfig

DEFAULT_CPU_KV_BYTES = 2 * 1024**3  # the CPU has no "free memory" to take a fraction of: a fixed budget
SCALE_BYTES = 4  # an int8 row's float32 scale, stored after its values


def kv_row_elements(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of the cache's dtype one cached row (a token's K or V for one kv head) takes: head_dim, and for
    int8 four more, which hold the row's float32 scale."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def cache_head_dim(kv_cache: torch.Tensor) -> int:
    """The head size of a cache (or a layer's, or one K/V half's): its last dimension, less an int8 row's scale."""
    return kv_cache.shape[-1] - (SCALE_BYTES if kv_cache.dtype == torch.int8 else 0)


def kv_cache_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V: an int8 cache's scales included."""
    rows = cfg.kv_bytes_per_token_per_element // cfg.head_dim * block_size  # layers x 2 x kv heads x tokens
    return rows * kv_row_elements(cfg.head_dim, dtype) * torch.empty((), dtype=dtype).element_size()


def plan_num_blocks(cfg: ModelConfig, block_size: int, dtype: torch.dtype, device: str,
                    kv_cache_memory: int | None, memory_utilization: float) -> int:
    """Blocks that fit the budget: an explicit byte count, else on CUDA a fraction of free memory."""
    per_block = kv_cache_bytes_per_block(cfg, block_size, dtype)
    if kv_cache_memory is None:
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            kv_cache_memory = int(free * memory_utilization)
        else:
            kv_cache_memory = DEFAULT_CPU_KV_BYTES
    return max(1, kv_cache_memory // per_block)


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: str) -> torch.Tensor:
    """[layers, 2 (K, V), kv_heads, blocks, block_size, head_dim] (int8: head_dim + 4, see above), zeroed once
    and reused for the server's life.

    Zeroed, not empty: padded reads touch unused slots, and garbage there could be NaN (masked, but NaN * 0);
    an int8 row of zeros is a zero row with scale 0."""
    return torch.zeros(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, num_blocks, block_size,
                       kv_row_elements(cfg.head_dim, dtype), dtype=dtype, device=device)
