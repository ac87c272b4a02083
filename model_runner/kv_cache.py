"""The paged KV cache: one preallocated tensor of fixed-size blocks, and the allocator that hands them out.

A sequence owns a block table (a list of block ids); its token at position p lives in block
block_table[p // block_size], offset p % block_size. Blocks need not be contiguous, so memory is never
fragmented, and reference counts let several sequences share a block (prefix caching).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .config import ModelConfig

DEFAULT_CPU_KV_BYTES = 2 * 1024**3  # the CPU has no "free memory" to take a fraction of: a fixed budget


# The first block's parent. Not None: hash(None) is an address on Python < 3.12, so the chains of two processes
# (a replica and the router in front of it, replicas/) would differ. hash() never returns -1 for any object, so
# no real parent hash equals it.
ROOT_PARENT = -1


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """Identity of a full block: its tokens and, through the parent's hash, every token before it. Only ints go
    in, so the value is the same in every process of one Python version (no hash randomization applies)."""
    return hash((ROOT_PARENT if parent is None else parent, token_ids))


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chain of block hashes a prefix-cache lookup walks for this prompt: one per full block, the last
    token excluded (it is always computed, for its logits), as the scheduler's lookup does."""
    hashes, parent = [], None
    for i in range((len(token_ids) - 1) // block_size):
        parent = block_hash(parent, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        hashes.append(parent)
    return hashes


class BlockAllocator:
    """Free list + reference counts, with an optional prefix cache over full blocks.

    The free list is kept in release order and doubles as the LRU of the prefix cache: a freed block keeps its
    contents and hash, so a later request with the same prefix can take it back (a hit); allocation takes the
    least recently freed block first and only then forgets what it held (eviction).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}                            # block hash -> block id
        self.block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block id -> (hash, token ids)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds (a cached block nobody holds is free: it sits on the free list)."""
        return self.num_blocks - len(self.free_ids)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """How many more blocks a table needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {len(self.free_ids)} free")
        ids = []
        for _ in range(n):
            i, _ = self.free_ids.popitem(last=False)
            if i in self.block_key:  # evict: its old contents are about to be overwritten
                h, _ = self.block_key.pop(i)
                if self.cached.get(h) == i:
                    del self.cached[h]
            self.ref_counts[i] = 1
            ids.append(i)
        return ids

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend block_table in place to hold num_tokens; False (and no change) if blocks ran out."""
        n = self.blocks_needed(block_table, num_tokens)
        if not self.can_allocate(n):
            return False
        block_table.extend(self.allocate(n))
        return True

    def share(self, block_id: int) -> None:
        """One more reference to a block (a prefix-cache hit may take it back from the free list)."""
        if self.ref_counts[block_id] == 0:
            del self.free_ids[block_id]
        self.ref_counts[block_id] += 1

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block (a sequence's table, released when it ends or is preempted).

        The table's tail goes to the free list first, so the shared head of a prefix is evicted last."""
        for i in reversed(block_table):
            self.ref_counts[i] -= 1
            assert self.ref_counts[i] >= 0, f"block {i} freed twice"
            if self.ref_counts[i] == 0:
                self.free_ids[i] = None
        block_table.clear()

    # --- prefix cache ------------------------------------------------------------------------------------

    def lookup(self, h: int, token_ids: tuple[int, ...]) -> int | None:
        """The cached block holding exactly these tokens after the prefix hashed into h, if any."""
        i = self.cached.get(h)
        if i is None or self.block_key[i][1] != token_ids:  # a hash collision is a miss, never a silent reuse
            return None
        return i

    def register(self, block_id: int, h: int, token_ids: tuple[int, ...]) -> None:
        """Record that a full block holds token_ids after the prefix hashed into h."""
        if self.enable_prefix_caching and block_id not in self.block_key:
            self.block_key[block_id] = (h, token_ids)
            self.cached.setdefault(h, block_id)


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
