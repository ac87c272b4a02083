"""The paged KV cache: one preallocated tensor of fixed-size blocks, and the allocator that hands them out.

A sequence owns a block table (a list of block ids); its token at position p lives in block
block_table[p // block_size], offset p % block_size. Blocks need not be contiguous, so memory is never
fragmented, and reference counts let several sequences share a block (prefix caching).
"""
from __future__ import annotations

from collections import deque

import torch

from .config import ModelConfig

DEFAULT_CPU_KV_BYTES = 2 * 1024**3  # the CPU has no "free memory" to take a fraction of: a fixed budget


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """How many more blocks a table needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {len(self.free_ids)} free")
        ids = [self.free_ids.popleft() for _ in range(n)]
        for i in ids:
            self.ref_counts[i] = 1
        return ids

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend block_table in place to hold num_tokens; False (and no change) if blocks ran out."""
        n = self.blocks_needed(block_table, num_tokens)
        if not self.can_allocate(n):
            return False
        block_table.extend(self.allocate(n))
        return True

    def share(self, block_id: int) -> None:
        self.ref_counts[block_id] += 1

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block (a sequence's table, released when it ends or is preempted)."""
        for i in block_table:
            self.ref_counts[i] -= 1
            assert self.ref_counts[i] >= 0, f"block {i} freed twice"
            if self.ref_counts[i] == 0:
                self.free_ids.append(i)
        block_table.clear()


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
    """[layers, 2 (K, V), slots, kv_heads, head_dim], zeroed once and reused for the server's life."""
    return torch.zeros(cfg.num_hidden_layers, 2, num_blocks * block_size, cfg.num_key_value_heads,
                       cfg.head_dim, dtype=dtype, device=device)
