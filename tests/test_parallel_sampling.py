"""n > 1: parallel samples of one prompt share its prompt KV blocks by reference count (engine, tiny-random)."""
import asyncio

from batcher.config import BatcherConfig
from batcher.engine import Engine
from model_runner.sampling_params import SamplingParams

from .engine_helpers import collect

PROMPT = [(7 * i + 3) % 300 + 3 for i in range(200)]  # 200 tokens: 12 full blocks of 16 and a partial one
N = 4


async def run_parallel(runner, params, n=N, cfg=None, prompt=PROMPT, record=False):
    engine = Engine(runner, cfg or BatcherConfig(), record_steps=record)
    await engine.start()
    try:
        streams = await engine.add_parallel_requests(prompt, params, n)
        results = await asyncio.gather(*(collect(s) for s in streams))
        return results, engine
    finally:
        await engine.stop()


async def single(runner, params, prompt=PROMPT):
    results, _ = await run_parallel(runner, params, 1, prompt=prompt)
    return results[0][0]


async def test_samples_equal_separate_requests_seeded_seed_plus_i(tiny_runner):
    """Sample i is exactly what a lone request with seed + i gives: the forked siblings read the shared prompt
    blocks correctly (any wrong K/V would change the tokens), and each draws from its own generator."""
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, seed=11)
    results, _ = await run_parallel(tiny_runner, params)
    alone = [await single(tiny_runner, SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, seed=11 + i))
             for i in range(N)]
    assert [r[0] for r in results] == alone
    assert len({tuple(a) for a in alone}) == N  # different seeds, different samples
    greedy, _ = await run_parallel(tiny_runner, SamplingParams(max_tokens=24, ignore_eos=True))
    assert all(r[0] == greedy[0][0] for r in greedy)  # greedy: n identical answers, as OpenAI gives


async def test_prompt_blocks_are_shared_not_copied(tiny_runner):
    """The most KV blocks in use at once stays far below n separate copies of the prompt."""
    bs = tiny_runner.block_size
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=1)
    results, engine = await run_parallel(tiny_runner, params, record=True)
    prompt_blocks = -(-len(PROMPT) // bs)
    peak = max(r.kv_blocks_used for r in engine.step_log)
    # Shared: the prompt's full blocks once, plus per sample its own tail block (+1 when its output crosses a
    # block boundary): 13 + 4 x 2 = 21 at most here; four copies would be 52.
    assert peak <= prompt_blocks + N * 2 < N * prompt_blocks, peak
    stats = engine.stats()
    assert stats.prompt_tokens == len(PROMPT)  # counted once for the group
    assert all(r[2].num_prompt_tokens == len(PROMPT) and r[2].num_output_tokens == 8 for r in results)
    assert engine.scheduler.num_blocks_used == 0


async def test_no_leak_when_some_finish_early_or_leave(tiny_runner):
    """Samples end at different times (different max_tokens cannot be asked, so stop tokens and aborts do it);
    every block comes back, whoever ends first."""
    engine = Engine(tiny_runner, BatcherConfig(num_kv_blocks=64))
    alloc = engine.scheduler.kv
    await engine.start()
    try:
        # Sampled at temperature 2 over a 320-token vocabulary, a sample emits one of 40 stop ids early or late.
        params = SamplingParams(max_tokens=60, temperature=2.0, seed=5, stop_token_ids=list(range(40, 80)))
        streams = await engine.add_parallel_requests(PROMPT, params, N)
        results = await asyncio.gather(*(collect(s) for s in streams))
        lengths = [r[2].num_output_tokens for r in results]
        assert len(set(lengths)) > 1, lengths  # they did finish at different times

        # One sample aborted mid-way, then the rest (the client left).
        streams = await engine.add_parallel_requests(PROMPT, SamplingParams(max_tokens=500, ignore_eos=True), N)
        firsts = [await anext(s) for s in streams]  # every sample is decoding
        assert all(not f.finished for f in firsts)
        streams[2].abort()
        assert (await collect(streams[2]))[2].finish_reason == "abort"
        for s in streams:
            s.abort()
        finals = [(await collect(s))[2] for i, s in enumerate(streams) if i != 2]
        assert all(f.finish_reason == "abort" for f in finals)

        # The first sample aborted before its prompt was computed: its siblings end too, never started.
        streams = await engine.add_parallel_requests(PROMPT, SamplingParams(max_tokens=5), N)
        streams[0].abort()
        finals = [(await collect(s))[2] for s in streams]
        assert all(f.finish_reason == "abort" and f.num_output_tokens == 0 for f in finals)
        assert not engine.requests and alloc.num_free == alloc.num_blocks
    finally:
        await engine.stop()
    assert alloc.num_free == alloc.num_blocks and all(c == 0 for c in alloc.ref_counts)


async def test_parallel_samples_under_every_policy(tiny_runner):
    """Run-to-completion policies take the forked samples into the running batch."""
    params = SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.0, seed=2)
    expected = None
    for policy in ("continuous", "static", "dynamic", "sequential"):
        results, engine = await run_parallel(tiny_runner, params, cfg=BatcherConfig(policy=policy))
        tokens = [r[0] for r in results]
        expected = expected or tokens
        assert tokens == expected and engine.scheduler.num_blocks_used == 0
