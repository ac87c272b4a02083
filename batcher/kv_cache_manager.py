"""The KV-cache manager: the one owner of which block holds what.

The runner owns the cache tensor (num_blocks blocks of block_size tokens) and reads block tables; this class
decides them. A sequence's token at position p lives in block block_table[p // block_size], offset
p % block_size, so blocks need not be contiguous and memory never fragments. Reference counts let several
sequences hold one block: parallel samples share their prompt's blocks (fork), and with prefix caching a full
block is found again by the hash of its tokens and of every token before it.

The free list is kept in release order and doubles as the LRU of the prefix cache: a freed block keeps its
contents and hash, so a later request with the same prefix can take it back (a hit); allocation takes the least
recently freed block first, and only then forgets what it held (eviction). A sequence's table is released tail
first, so the shared head of a prefix is evicted last.

The scheduler calls four things: find_computed_blocks, allocate_slots, free, cache_full_blocks (and fork for
n > 1). Everything else here is for tests and statistics.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from model_runner.errors import InvalidRequestError
from model_runner.sequence import Sequence


# The parent of a prompt's first block. A constant, not None: before Python 3.12 hash(None) differs from one
# process to the next, and chains must agree across processes (replicas compare them).
ROOT_HASH = 0


def hash_block(parent: int, token_ids: tuple[int, ...]) -> int:
    """Identity of a full block: its tokens and, through the parent's hash, every token before it."""
    return hash((parent, token_ids))


def _chain(token_ids: list[int], block_size: int, start: int = 0,
           parent: int = ROOT_HASH) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(hash, tokens) of each full block from block index `start`, lazily (a lookup stops at its first miss)."""
    for i in range(start, len(token_ids) // block_size):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        parent = hash_block(parent, tokens)
        yield parent, tokens


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The hash chain of a token list's full blocks, as the prefix cache keys them: two lists share their first
    k hashes when they share their first k blocks of tokens (and, but for a 64-bit collision, only then).
    Python hashes tuples of ints the same in every process (PYTHONHASHSEED salts only str and bytes), so
    replicas can compare chains."""
    return [h for h, _ in _chain(token_ids, block_size)]


@dataclass
class ComputedBlocks:
    """A prefix-cache hit: cached blocks holding a sequence's leading full blocks, and their hashes."""
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    num_queried: int = 0  # full blocks looked up (the hit rate's denominator)

    def __len__(self) -> int:
        return len(self.blocks)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}                            # block hash -> block id
        self.block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block id -> (hash, token ids)
        self._hashes: dict[int, list[int]] = {}                     # seq id -> hashes of its cached full blocks

    def __repr__(self) -> str:
        return (f"KVCacheManager({self.num_used}/{self.num_blocks} blocks used x {self.block_size} tokens, "
                f"{len(self.cached)} cached prefixes)")

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds (a cached block nobody holds is free: it sits on the free list)."""
        return self.num_blocks - len(self.free_ids)

    def check_fits(self, num_prompt_tokens: int) -> None:
        """Refuses up front a prompt this cache could never hold, with its first generated token, even empty
        (admission would wait for it forever)."""
        if -(-(num_prompt_tokens + 1) // self.block_size) > self.num_blocks:
            raise InvalidRequestError(f"the prompt needs more KV cache than exists ({self.num_blocks} blocks of "
                                      f"{self.block_size} tokens); raise --kv-cache-memory")

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """How many more blocks a table needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    # --- the scheduler's interface ------------------------------------------------------------------------

    def find_computed_blocks(self, seq: Sequence) -> ComputedBlocks:
        """Cached blocks holding seq's leading full blocks (at least its last token is left to compute: its
        logits are needed). Nothing is taken yet: allocate_slots takes them."""
        hit = ComputedBlocks()
        # A request for prompt logprobs needs every prompt position's logits: its prompt is computed, not reused.
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return hit
        hit.num_queried = (len(seq) - 1) // self.block_size
        for h, tokens in _chain(seq.token_ids[:len(seq) - 1], self.block_size):
            b = self.lookup(h, tokens)
            if b is None:
                break
            hit.blocks.append(b)
            hit.hashes.append(h)
        return hit

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed: ComputedBlocks | None = None) -> bool:
        """Grows seq's table to hold its computed tokens, the hit's and num_new_tokens more; False, and no
        change, when blocks run out. A hit is taken only with an empty table (a new or preempted sequence)."""
        num_tokens = seq.num_computed_tokens + num_new_tokens
        if computed:
            assert not seq.block_table and not seq.num_computed_tokens, f"{seq!r} has begun already"
            num_tokens += len(computed) * self.block_size
            revived = sum(self.ref_counts[b] == 0 for b in computed.blocks)  # hits that sit in the free list
            if self.blocks_needed(computed.blocks, num_tokens) > self.num_free - revived:
                return False
            for b in computed.blocks:
                self._share(b)
            seq.block_table = list(computed.blocks)
            self._hashes[seq.seq_id] = list(computed.hashes)
        n = self.blocks_needed(seq.block_table, num_tokens)
        if n > len(self.free_ids):
            return False
        seq.block_table.extend(self._allocate(n))
        return True

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """child (holding nothing yet) shares parent's first num_blocks blocks, by reference count."""
        assert not child.block_table, f"{child!r} already holds blocks"
        for b in parent.block_table[:num_blocks]:
            self._share(b)
        child.block_table = parent.block_table[:num_blocks]

    def free(self, seq: Sequence) -> None:
        """Drops seq's reference to each of its blocks (it ended or was preempted); its table becomes empty."""
        for i in reversed(seq.block_table):
            self.ref_counts[i] -= 1
            assert self.ref_counts[i] >= 0, f"block {i} freed twice"
            if self.ref_counts[i] == 0:
                self.free_ids[i] = None
        seq.block_table.clear()
        self._hashes.pop(seq.seq_id, None)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Blocks whose K/V are now complete become findable by later requests with the same prefix."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes.setdefault(seq.seq_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        if len(hashes) >= num_full:
            return
        chain = _chain(seq.token_ids[:num_full * self.block_size], self.block_size, len(hashes),
                       hashes[-1] if hashes else ROOT_HASH)
        for i, (h, tokens) in enumerate(chain, start=len(hashes)):
            hashes.append(h)
            b = seq.block_table[i]
            if b not in self.block_key:
                self.block_key[b] = (h, tokens)
                self.cached.setdefault(h, b)

    # --- blocks -------------------------------------------------------------------------------------------

    def _allocate(self, n: int) -> list[int]:
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

    def _share(self, block_id: int) -> None:
        """One more reference to a block (a prefix-cache hit may take it back from the free list)."""
        if self.ref_counts[block_id] == 0:
            del self.free_ids[block_id]
        self.ref_counts[block_id] += 1

    def lookup(self, h: int, token_ids: tuple[int, ...]) -> int | None:
        """The cached block holding exactly these tokens after the prefix hashed into h, if any."""
        b = self.cached.get(h)
        # A hash collision is a miss, never a silent reuse.
        return None if b is None or self.block_key[b][1] != token_ids else b
