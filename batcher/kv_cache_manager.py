"""The KV-cache manager: the one owner of which block holds what.

The runner owns the cache tensor (num_blocks blocks of block_size tokens) and reads block tables; this class
decides them. A sequence's token at position p lives in block block_table[p // block_size], offset
p % block_size, so blocks need not be contiguous and memory never fragments. Reference counts let several
sequences hold one block: parallel samples share their prompt's blocks (fork), and with prefix caching a full
block is found again by the hash of its tokens and of every token before it.

The free list is kept in release order and doubles as the LRU of the prefix cache: a freed block keeps its
contents and hash, so a later request with the same prefix can take it back (a hit); allocation starts from the
least recently freed block, and only then forgets what it held (eviction). A sequence's table is released tail
first, so the shared head of a prefix is evicted last.

Blocks need not be contiguous, but decode attention reads each sequence's blocks in order, and a run of
adjacent blocks reads faster than scattered ones (the prefetchers follow a run). Sequences growing side by side
would interleave their blocks, and after a while a free list in release order scatters them: on the AMX Xeon a
long-lived server's decode steps took about 1.18x the time of the same steps over packed blocks
(`python -m benchmarks.kv_layout`, docs/benchmarks.md). So blocks go out in runs. A sequence that needs a block
and has none claimed claims a run of free blocks, as many as it expects to need (prompt + max_tokens, at most
MAX_CLAIM): right after its last block, or else from the least recently freed block with that many free after it
(the longest run among the RUN_CANDIDATES oldest when none has), and takes them as it grows. A claim is soft:
claimed blocks stay free (every capacity count is unchanged), other runs avoid them, and when nothing else is
free they are taken all the same.

Runs bend the LRU only where no hit is lost: a block whose cached contents were taken again (a hit, a fork)
joins a run only from the oldest 1/OLD_SHARE of the free list, while a block nobody reused (most of a finished
request's blocks: its own question and its output) may be overwritten out of turn. The hit rate stayed within
a point of the strict LRU's, or above it (`python -m benchmarks.prefix_hits`).

The scheduler calls four things: find_computed_blocks, allocate_slots, free, cache_full_blocks (and fork for
n > 1). Everything else here is for tests and statistics.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from model_runner.errors import InvalidRequestError
from model_runner.sequence import Sequence


# The parent of a prompt's first block. A constant, not None: before Python 3.12 hash(None) differs from one
# process to the next, and chains must agree across processes (replicas compare them).
ROOT_HASH = 0

MAX_CLAIM = 32       # blocks a sequence claims ahead at most (512 tokens at 16 a block): it claims again past it
RUN_CANDIDATES = 32  # oldest free blocks tried as a run's start (bounds a claim's cost when memory is fragmented)
OLD_SHARE = 16       # a block a hit reused joins a run only from the oldest 1/OLD_SHARE of the free list


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
        self._claims: dict[int, deque[int]] = {}                    # seq id -> free blocks it will grow into, in order
        self._claimed: dict[int, int] = {}                          # block id -> the seq id claiming it
        self._freed_at = [0] * num_blocks                           # block id -> when it was freed (a count)
        self._reused: set[int] = set()                              # blocks whose contents a hit or fork took again
        self._frees = 0                                             # blocks freed so far (the clock of _freed_at)

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
        for _ in range(n):
            seq.block_table.append(self._take(self._next_block(seq)))
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
                self._frees += 1
                self._freed_at[i] = self._frees
        seq.block_table.clear()
        self._hashes.pop(seq.seq_id, None)
        for b in self._claims.pop(seq.seq_id, ()):
            del self._claimed[b]

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

    def _take(self, i: int) -> int:
        """Takes free block i for one holder, forgetting what it held (eviction)."""
        del self.free_ids[i]
        self._unclaim(i)
        self._reused.discard(i)
        if i in self.block_key:  # evict: its old contents are about to be overwritten
            h, _ = self.block_key.pop(i)
            if self.cached.get(h) == i:
                del self.cached[h]
        self.ref_counts[i] = 1
        return i

    def _unclaim(self, i: int) -> None:
        if (owner := self._claimed.pop(i, None)) is not None:
            self._claims[owner].remove(i)

    def _next_block(self, seq: Sequence) -> int:
        """The free block seq should take next: the head of its claim, claiming a new run when it has none."""
        claim = self._claims.get(seq.seq_id)
        if not claim:
            claim = self._claims[seq.seq_id] = deque(self._find_run(seq))
            for b in claim:
                self._unclaim(b)  # (only when nothing unclaimed was free: taken from another's claim)
                self._claimed[b] = seq.seq_id
        return claim[0]

    def _find_run(self, seq: Sequence) -> list[int]:
        """Free, unclaimed, adjacent blocks for seq to grow into: as many as it is expected to need (at least
        one, at most MAX_CLAIM), from right after its last block or else from the least recently freed open block
        with that many after it (the longest run among the oldest RUN_CANDIDATES when none has); when no free block
        is open (every one claimed, or reused and not old yet), the least recently freed. A freed sequence's
        blocks sit in the free list tail first, so a short run reuses its tail end and a long one the whole run
        from its head."""
        expected = -(-(seq.num_prompt_tokens + seq.params.max_tokens) // self.block_size) - len(seq.block_table)
        want = min(max(expected, 1), MAX_CLAIM)
        best: list[int] = []
        old = max(want, len(self.free_ids) // OLD_SHARE)
        cutoff = next((self._freed_at[b] for b in itertools.islice(self.free_ids, old, None)), self._frees)
        is_open = lambda b: (b in self.free_ids and b not in self._claimed  # noqa: E731
                             and (b not in self._reused or self._freed_at[b] <= cutoff))
        starts = [seq.block_table[-1] + 1] if seq.block_table else []
        for start in itertools.chain(starts, itertools.islice(filter(is_open, self.free_ids), RUN_CANDIDATES)):
            run = []
            while len(run) < want and is_open(start + len(run)):
                run.append(start + len(run))
            if len(run) > len(best):
                best = run
                if len(best) == want:
                    break
        return best or [next(iter(self.free_ids))]

    def _share(self, block_id: int) -> None:
        """One more reference to a block (a prefix-cache hit may take it back from the free list)."""
        if self.ref_counts[block_id] == 0:
            del self.free_ids[block_id]
            self._unclaim(block_id)
        self.ref_counts[block_id] += 1
        self._reused.add(block_id)

    def lookup(self, h: int, token_ids: tuple[int, ...]) -> int | None:
        """The cached block holding exactly these tokens after the prefix hashed into h, if any."""
        b = self.cached.get(h)
        # A hash collision is a miss, never a silent reuse.
        return None if b is None or self.block_key[b][1] != token_ids else b
