"""The scheduler alone: a step's plan is plain data, checked here without any model."""
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import EndReason, Sequence

from batcher.config import BatcherConfig
from batcher.scheduler import Scheduler

EOS = 0


def make(policy="continuous", blocks=64, block_size=4, **kw):
    cfg = BatcherConfig(policy=policy, **{"max_num_batched_tokens": 512, **kw})  # the budget a runner would give
    return Scheduler(cfg, blocks, block_size, (EOS,), max_model_len=4096)


def seq(n_prompt, max_tokens=4, first=1):
    return Sequence(list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def step(s, token=7):
    out = s.schedule()
    sampled = [token if q.num_computed_tokens + n == len(q) else None for q, n in out.scheduled]
    s.update(out, sampled)  # (the sequences that ended: those the plan ended, then those this step's token ended)
    return out, list(out.finished) + [q for q, _ in out.scheduled if q.is_finished]


def plan(out):
    return [(q.seq_id, n) for q, n in out.scheduled]


def test_continuous_admits_every_step_and_retires_each_when_done():
    s = make()
    a, b = seq(5, max_tokens=2), seq(3, max_tokens=4)
    s.add(a)
    out, _ = step(s)
    assert plan(out) == [(a.seq_id, 5)]
    s.add(b)
    out, fin = step(s)
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 3)]      # b joins while a decodes
    assert fin == [a] and a.finish_reason == EndReason.LENGTH
    assert a.block_table == []                              # freed the step it finished
    while s.has_work():
        step(s)
    assert s.kv.num_free == 64


def test_token_budget_chunks_long_prompts_beside_decodes():
    s = make(max_num_batched_tokens=8)
    a, b = seq(3, max_tokens=10), seq(20, max_tokens=2, first=100)
    s.add(a)
    step(s)
    s.add(b)
    out, _ = step(s)
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 7)]      # decode first, then a 7-token chunk
    out, _ = step(s)
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 7)] and b.num_output_tokens == 0
    out, _ = step(s)
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 6)] and b.num_output_tokens == 1


def test_preemption_frees_newest_and_requeues_it_first():
    s = make(blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = seq(8, max_tokens=20), seq(8, max_tokens=20, first=50)  # 2 blocks each, 7 each at the end
    s.add(a)
    s.add(b)
    step(s)
    assert len(s.running) == 2 and s.kv.num_free == 4
    preempted = []
    for _ in range(12):
        out, _ = step(s)
        preempted += out.preempted
        if out.preempted:
            assert not out.admitted                          # a step that preempted admits nobody
            break
    assert preempted == [b] and b.block_table == [] and b.num_computed_tokens == 0
    assert s.waiting[0] is b and s.stats.preemptions == 1
    while s.has_work():
        step(s)
    assert a.num_output_tokens == 20 and b.num_output_tokens == 20
    assert s.kv.num_free == 8


def test_a_sequence_too_big_for_the_whole_cache_ends_with_length():
    s = make(blocks=2, block_size=4)
    a = seq(6, max_tokens=50)
    s.add(a)
    fins = []
    for _ in range(10):
        fins += step(s)[1]
    assert fins == [a] and a.finish_reason == EndReason.LENGTH and s.kv.num_free == 2


def test_static_batch_runs_to_completion_without_joiners():
    s = make(policy="static", max_batch_size=2)
    a, b, c = seq(3, max_tokens=1), seq(3, max_tokens=5, first=20), seq(3, first=40)
    for q in (a, b, c):
        s.add(q)
    out, fin = step(s)
    assert {q for q, _ in out.scheduled} == {a, b} and fin == [a]
    for _ in range(4):
        out, _ = step(s)
        assert [q for q, _ in out.scheduled] == [b]          # a's slot idles; c may not join
    out, _ = step(s)
    assert [q for q, _ in out.scheduled] == [c]


def test_sequential_runs_one_at_a_time():
    s = make(policy="sequential")
    a, b = seq(3, max_tokens=2), seq(3, max_tokens=2, first=9)
    s.add(a)
    s.add(b)
    seen = []
    while s.has_work():
        out, _ = step(s)
        seen.append([q.seq_id for q, _ in out.scheduled])
    assert all(len(x) == 1 for x in seen) and seen[0] == [a.seq_id] and seen[-1] == [b.seq_id]


def test_prefix_cache_hit_shares_blocks_and_skips_their_prefill():
    s = make(block_size=4)
    shared = list(range(1, 13))                              # 3 full blocks
    a = Sequence(shared + [50, 51], SamplingParams(max_tokens=1))
    s.add(a)
    step(s)
    assert a.is_finished
    b = Sequence(shared + [60], SamplingParams(max_tokens=2))
    s.add(b)
    out, _ = step(s)
    assert plan(out) == [(b.seq_id, 1)] and b.num_cached_tokens == 12
    assert s.stats.prefix_hits == 3


def test_prefix_cache_never_reuses_on_a_hash_collision():
    s = make(block_size=4)
    a = Sequence(list(range(1, 10)), SamplingParams(max_tokens=1))
    s.add(a)
    step(s)
    # Forge a collision: b's first block hashes to a's, but holds other tokens.
    h, _ = s.kv.block_key[next(iter(s.kv.block_key))]
    assert s.kv.lookup(h, (9, 9, 9, 9)) is None


def test_prefix_cache_off_computes_everything():
    s = make(enable_prefix_caching=False)
    for _ in range(2):
        q = Sequence(list(range(1, 14)), SamplingParams(max_tokens=1))
        s.add(q)
        out, _ = step(s)
        assert plan(out) == [(q.seq_id, 13)]


def test_evicted_prefix_blocks_are_forgotten():
    s = make(blocks=4, block_size=4)
    a = Sequence(list(range(1, 10)), SamplingParams(max_tokens=1))   # 3 blocks, 2 full and cached
    s.add(a)
    step(s)
    big = Sequence(list(range(100, 115)), SamplingParams(max_tokens=1))  # takes all 4 blocks: evicts a's
    s.add(big)
    step(s)
    c = Sequence(list(range(1, 10)), SamplingParams(max_tokens=1))
    s.add(c)
    out, _ = step(s)
    assert plan(out) == [(c.seq_id, 9)] and c.num_cached_tokens == 0
