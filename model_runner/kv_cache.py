"""The paged KV cache's memory: how many blocks fit a budget, and the one preallocated tensor that holds them.

A sequence's token at position p lives in block block_table[p // block_size], offset p % block_size. Which
block holds what is decided by the batcher's KVCacheManager; the runner only reads the tables it is given.
"""
from __future__ import annotations

import torch

from .config import ModelConfig

DEFAULT_CPU_KV_BYTES = 2 * 1024**3  # the CPU has no "free memory" to take a fraction of: a fixed budget


def kv_cache_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.kv_bytes_per_token_per_element * block_size * torch.empty((), dtype=dtype).element_size()


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
    """[layers, 2 (K, V), kv_heads, blocks, block_size, head_dim], zeroed once and reused for the server's life.

    Zeroed, not empty: padded reads touch unused slots, and garbage there could be NaN (masked, but NaN * 0)."""
    return torch.zeros(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, num_blocks, block_size,
                       cfg.head_dim, dtype=dtype, device=device)
