"""The KV-cache manager alone: allocation, sharing, prefix hits, eviction order, and nothing leaks."""
import random
from collections import deque

import pytest

from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

from batcher import kv_cache_manager
from batcher.kv_cache_manager import MAX_CLAIM, KVCacheManager, prefix_block_hashes


def seq(tokens, **kw):
    return Sequence(list(tokens), SamplingParams(**kw))


def computed(kv, s, n):
    """s has computed n tokens, and its full blocks are cached (what the scheduler does after a step)."""
    s.num_computed_tokens = n
    kv.cache_full_blocks(s)


def test_allocation_is_all_or_nothing_and_refcounted():
    kv = KVCacheManager(4, 16)
    s = seq(range(40))
    assert kv.allocate_slots(s, 33) and len(s.block_table) == 3 and kv.num_free == 1
    assert not kv.allocate_slots(s, 80) and len(s.block_table) == 3  # refused whole, nothing taken
    assert kv.allocate_slots(s, 33) and len(s.block_table) == 3      # already held: nothing more
    kv.free(s)
    assert s.block_table == [] and kv.num_free == 4 and all(c == 0 for c in kv.ref_counts)


def test_fork_shares_blocks_until_the_last_holder_frees_them():
    kv = KVCacheManager(8, 4)
    parent, child = seq(range(10)), seq(range(10))
    assert kv.allocate_slots(parent, 10)                              # 3 blocks
    kv.fork(parent, child, 2)
    assert child.block_table == parent.block_table[:2] and kv.num_used == 3
    assert [kv.ref_counts[b] for b in parent.block_table] == [2, 2, 1]
    child.num_computed_tokens = 8
    assert kv.allocate_slots(child, 2) and kv.num_used == 4           # its own tail block
    kv.free(parent)
    assert kv.num_used == 3 and all(kv.ref_counts[b] == 1 for b in child.block_table)
    kv.free(child)
    assert kv.num_free == 8


def test_prefix_hit_takes_cached_blocks_and_leaves_the_last_token_to_compute():
    kv = KVCacheManager(8, 4, enable_prefix_caching=True)
    a = seq(range(1, 13))                                             # exactly 3 full blocks
    assert kv.allocate_slots(a, 12)
    computed(kv, a, 12)
    held = list(a.block_table)
    kv.free(a)
    b = seq(range(1, 13))
    hit = kv.find_computed_blocks(b)
    assert hit.blocks == held[:2] and hit.num_queried == 2            # the third holds b's last token
    assert hit.hashes == prefix_block_hashes(list(range(1, 13)), 4)[:2]
    assert kv.allocate_slots(b, 4, hit) and b.block_table[:2] == held[:2] and kv.num_used == 3


def test_no_hit_without_prefix_caching_or_with_prompt_logprobs():
    kv = KVCacheManager(8, 4)
    a = seq(range(1, 10))
    kv.allocate_slots(a, 9)
    computed(kv, a, 9)
    assert not kv.find_computed_blocks(seq(range(1, 10)))
    kv = KVCacheManager(8, 4, enable_prefix_caching=True)
    a = seq(range(1, 10))
    kv.allocate_slots(a, 9)
    computed(kv, a, 9)
    assert kv.find_computed_blocks(seq(range(1, 10))).blocks == a.block_table[:2]
    assert not kv.find_computed_blocks(seq(range(1, 10), prompt_logprobs=1))


def test_eviction_reuses_a_freed_tail_first_and_a_prefix_head_last():
    kv = KVCacheManager(4, 2, enable_prefix_caching=True)
    a = seq(range(1, 7))                                              # 3 full blocks (and block 3 claimed)
    kv.allocate_slots(a, 6)
    computed(kv, a, 6)
    head, mid, tail = a.block_table
    assert a.block_table == [0, 1, 2]
    kv.free(a)                                                        # freed tail first: the head goes last
    assert list(kv.free_ids) == [3, tail, mid, head] and not kv._claimed
    b = seq([50, 51, 52, 53], max_tokens=1)                           # expects 3 blocks: the oldest run of 3
    kv.allocate_slots(b, 4)                                           # starts at mid: 3 and tail are too short
    assert b.block_table == [mid, tail] and kv._claims[b.seq_id] == deque([3])
    assert kv.find_computed_blocks(seq(range(1, 8))).blocks == [head]  # the evicted tail is forgotten
    c = seq([60, 61], max_tokens=1)
    kv.allocate_slots(c, 2)                                           # the one unclaimed block left
    assert c.block_table == [head] and not kv.find_computed_blocks(seq(range(1, 8)))


def test_sequences_growing_side_by_side_keep_their_blocks_adjacent():
    """Two sequences decoding in turn would interleave their blocks a block at a time; each claims a run for
    its expected length instead, so each table is one run of adjacent blocks (what decode attention reads
    fastest)."""
    kv = KVCacheManager(64, 4)
    seqs = [seq(range(8), max_tokens=24), seq(range(8), max_tokens=24), seq(range(5), max_tokens=40)]
    for s in seqs:
        assert kv.allocate_slots(s, len(s))
        s.num_computed_tokens = len(s)
    for _ in range(24):
        for s in seqs:
            assert kv.allocate_slots(s, 1)
            s.num_computed_tokens += 1
    for s in seqs:
        t = s.block_table
        assert t == list(range(t[0], t[0] + len(t))), t
    # Past its claim (at most MAX_CLAIM blocks) a sequence claims again, from right after its last block.
    s = seq(range(4), max_tokens=1)
    kv2 = KVCacheManager(MAX_CLAIM * 3, 1)
    assert kv2.allocate_slots(s, 4) and s.block_table == [0, 1, 2, 3]
    s.num_computed_tokens = 4
    assert kv2.allocate_slots(s, MAX_CLAIM * 2) and s.block_table == list(range(4 + MAX_CLAIM * 2))


def test_a_claim_is_soft_capacity_counts_every_free_block():
    kv = KVCacheManager(8, 4)
    a, b = seq(range(8), max_tokens=24), seq(range(8), max_tokens=1)
    assert kv.allocate_slots(a, 8) and a.block_table == [0, 1]        # claims 2..7 for its 24 more tokens
    assert kv.num_free == 6 and len(kv._claimed) == 6
    assert kv.allocate_slots(b, 8)                                    # only claimed blocks are free: taken
    assert b.block_table == [2, 3] and list(kv._claims[a.seq_id]) == [4, 5, 6, 7]
    a.num_computed_tokens = 8
    assert kv.allocate_slots(a, 16) and a.block_table == [0, 1, 4, 5, 6, 7] and kv.num_free == 0
    assert not kv.allocate_slots(b, 9)
    kv.free(a)
    kv.free(b)
    assert kv.num_free == 8 and not kv._claimed and not kv._claims


def test_a_hit_revived_from_the_free_list_is_counted_against_free_blocks():
    kv = KVCacheManager(3, 2, enable_prefix_caching=True)
    a = seq(range(1, 5))
    kv.allocate_slots(a, 4)
    computed(kv, a, 4)
    kv.free(a)
    b = seq(range(1, 8))                                              # hits 2 blocks, needs 2 more: 4 > 3
    hit = kv.find_computed_blocks(b)
    assert len(hit) == 2 and not kv.allocate_slots(b, 3, hit)
    assert b.block_table == [] and kv.num_free == 3                   # refused whole
    assert kv.allocate_slots(b, 1, hit) and kv.num_used == 3


def test_random_mix_leaks_nothing():
    """Grow, fork, hit and free at random; at the end every block is free and every count zero."""
    rng = random.Random(0)
    kv = KVCacheManager(24, 4, enable_prefix_caching=True)
    live = []
    for _ in range(2000):
        r = rng.random()
        if r < 0.4:
            s = seq([rng.randrange(3) for _ in range(rng.randrange(1, 20))])
            hit = kv.find_computed_blocks(s)
            n = len(s) - len(hit) * 4
            if kv.allocate_slots(s, n, hit):
                computed(kv, s, len(s))
                live.append(s)
        elif r < 0.55 and live:
            p = rng.choice(live)
            c = seq(p.token_ids)
            kv.fork(p, c, len(p.block_table) // 2)
            live.append(c)
        elif r < 0.7 and live:
            s = rng.choice(live)
            if kv.allocate_slots(s, 1):
                s.token_ids.append(1)
                computed(kv, s, s.num_computed_tokens + 1)
        elif live:
            kv.free(live.pop(rng.randrange(len(live))))
        assert kv.num_used == len({b for s in live for b in s.block_table})
        # Claims only ever name free blocks, each one claimed by one live sequence, both maps agreeing.
        assert all(b in kv.free_ids for b in kv._claimed)
        assert {b: sid for sid, c in kv._claims.items() for b in c} == kv._claimed
        assert set(kv._claims) <= {s.seq_id for s in live}
    for s in live:
        kv.free(s)
    assert kv.num_free == kv.num_blocks and all(c == 0 for c in kv.ref_counts) and not kv._hashes
    assert not kv._claims and not kv._claimed


def test_prefix_block_hashes_chain_over_full_blocks():
    a = prefix_block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3 and a == prefix_block_hashes([1, 2, 3, 4, 5, 6, 9], 2)
    b = prefix_block_hashes([1, 2, 9, 4, 5, 6], 2)
    assert b[0] == a[0] and b[1] != a[1] and b[2] != a[2]             # a change reaches every later block


def test_prefix_block_hashes_agree_across_processes():
    """A router compares chains computed in other processes: no per-process salt may enter them."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's batcher, whatever is installed
    code = "from batcher.kv_cache_manager import prefix_block_hashes as p; print(p(list(range(40)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}).stdout
    assert out.strip() == str(prefix_block_hashes(list(range(40)), 16))


class StrictLRU(KVCacheManager):
    """The allocator before runs: every block the least recently freed one (a one-block claim, no look-ahead)."""

    def _find_run(self, seq):
        return [next(iter(self.free_ids))]


@pytest.mark.parametrize("num_blocks,tenants", [(400, 32), (800, 128), (1600, 32)])
def test_runs_keep_the_prefix_hit_rate_of_a_strict_lru(monkeypatch, num_blocks, tenants):
    """benchmarks.prefix_hits' multi-tenant workload under memory pressure: the run allocator finds as many
    prompt blocks as strict LRU eviction (within a point), because a block a hit took again joins a run only
    when it is among the oldest free blocks. Without that rule (every free block open to a run) it finds
    clearly fewer, so the comparison can tell. Deterministic: seeded, no timing."""
    from benchmarks import prefix_hits
    kw = dict(num_blocks=num_blocks, tenants=tenants, steps=6000, seed=1)
    runs = prefix_hits.hit_rate(**kw)
    monkeypatch.setattr(prefix_hits, "KVCacheManager", StrictLRU)
    lru = prefix_hits.hit_rate(**kw)
    assert runs >= lru - 0.01, (runs, lru)
    monkeypatch.setattr(prefix_hits, "KVCacheManager", KVCacheManager)
    monkeypatch.setattr(kv_cache_manager, "OLD_SHARE", 1)  # the oldest 1/1 of the free list: every block
    unprotected = prefix_hits.hit_rate(**kw)
    assert unprotected < lru - 0.01, (unprotected, lru)
