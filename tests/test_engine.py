"""The engine on the tiny model: nothing leaks, nothing is lost, overload is refused up front."""
import asyncio
import random

import pytest

from model_runner.errors import InvalidRequestError, InvalidSamplingParams
from model_runner.sampling_params import SamplingParams

from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.request_queue import Overloaded

from .engine_helpers import collect, greedy, run_requests


async def test_randomized_mix_leaks_nothing(tiny_runner):
    rng = random.Random(1)
    # Few running slots and long outputs, so a backlog builds and some requests pass their deadline: 300
    # arrivals in 0.5 s against ~3,700 decode steps of work, which takes seconds however fast the machine.
    # 12 KV blocks: one request fits alone (<= 11 blocks); four contend.
    cfg = BatcherConfig(max_num_seqs=4, max_num_batched_tokens=24, timeout_s=0.2, max_queue=1000, num_kv_blocks=12)
    engine = Engine(tiny_runner, cfg)
    alloc = engine.scheduler.kv
    await engine.start()
    outcomes = {"stop": 0, "length": 0, "abort": 0, "timeout": 0}

    async def one(i):
        await asyncio.sleep(rng.uniform(0, 0.5))
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 70))]
        stream = await engine.add_request(prompt, greedy(rng.randrange(1, 100)))
        if rng.random() < 0.3:  # abort at a random moment: queued, prefilling or decoding
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.3), stream.abort)
        _, _, final = await collect(stream)
        assert final.finished
        outcomes["timeout" if final.error == "timeout" else final.finish_reason] += 1

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), timeout=120)
    stats = engine.stats()
    await engine.stop()
    assert sum(outcomes.values()) == 300 and not engine.requests
    assert alloc.num_free == alloc.num_blocks and stats.kv_blocks_used == 0
    assert stats.preemptions > 0 and outcomes["abort"] > 0 and outcomes["length"] > 0
    assert outcomes["timeout"] > 0, outcomes


async def test_overload_is_refused_at_once_and_accepted_requests_finish(tiny_runner):
    engine = Engine(tiny_runner, BatcherConfig(max_queue=4, max_num_seqs=2))
    await engine.start()
    accepted, refused = [], 0
    try:
        for i in range(30):
            try:
                accepted.append(await engine.add_request([5 + i, 6, 7], greedy(20)))
            except Overloaded as e:
                refused += 1
                assert e.retry_after >= 1 and "overloaded" in str(e)
        assert refused > 0 and len(accepted) >= 4
        results = await asyncio.gather(*(collect(s) for s in accepted))
        assert all(final.finish_reason == "length" and len(toks) == 20 for toks, _, final in results)
    finally:
        await engine.stop()


async def test_queue_deadline_fails_with_a_clear_error(tiny_runner):
    engine = Engine(tiny_runner, BatcherConfig(policy="sequential", timeout_s=0.05))
    await engine.start()
    try:
        first = await engine.add_request([5, 6, 7], greedy(200))
        second = await engine.add_request([8, 9], greedy(5))
        (_, _, f1), (_, text, f2) = await asyncio.gather(collect(first), collect(second))
        assert f1.finish_reason == "length"
        assert f2.error == "timeout" and "not started within 0.05s" in text
    finally:
        await engine.stop()


async def test_max_queued_tokens_bound(tiny_runner):
    engine = Engine(tiny_runner, BatcherConfig(policy="sequential", max_queued_tokens=100))
    await engine.start()
    try:
        running = await engine.add_request([5] * 10, greedy(50))
        await asyncio.sleep(0.05)
        await engine.add_request([5] * 60, greedy(2))
        with pytest.raises(Overloaded):
            await engine.add_request([5] * 60, greedy(2))
        running.abort()
    finally:
        await engine.stop(grace_s=5)


async def test_invalid_requests_are_refused_before_queueing(tiny_runner):
    engine = Engine(tiny_runner)
    await engine.start()
    try:
        with pytest.raises(InvalidRequestError, match="empty"):
            await engine.add_request([], greedy(4))
        with pytest.raises(InvalidSamplingParams, match="max_tokens"):  # the API answers this kind 422
            await engine.add_request([5], greedy(0))
        with pytest.raises(InvalidSamplingParams, match="top_p"):
            await engine.add_request([5], SamplingParams(max_tokens=2, top_p=0.0))
        with pytest.raises(InvalidRequestError, match="empty") as refused:
            await engine.add_request([], greedy(4))
        assert not isinstance(refused.value, InvalidSamplingParams)  # the prompt's errors stay 400
        assert engine.stats().waiting == 0
    finally:
        await engine.stop()


async def test_a_prompt_the_engines_cache_cannot_hold_is_refused_up_front(tiny_runner):
    """The engine's own cache (num_kv_blocks, below the runner's) decides: a prompt that could never be admitted
    is refused at once, never queued to wait for blocks that will not come; one block less is served."""
    bs = tiny_runner.block_size
    engine = Engine(tiny_runner, BatcherConfig(num_kv_blocks=3))
    await engine.start()
    try:
        with pytest.raises(InvalidRequestError, match="more KV cache than exists"):
            await engine.add_request([5] * (3 * bs), greedy(2))   # with its first output token: 4 blocks
        assert engine.stats().waiting == 0
        tokens, _, _ = await collect(await engine.add_request([5] * (3 * bs - 1), greedy(1)))
        assert len(tokens) == 1
    finally:
        await engine.stop()


async def test_stop_strings_and_timings(tiny_runner):
    tok = tiny_runner.tokenizer
    [(free, _, _)], _ = await run_requests(tiny_runner, BatcherConfig(), [tok("ab")["input_ids"]], [greedy(30)])
    text = tok.decode(free)
    stop = text[5:7]  # a stop string we know occurs in the greedy text
    [(toks, out_text, final)], _ = await run_requests(tiny_runner, BatcherConfig(), [tok("ab")["input_ids"]],
                                                       [greedy(30, stop=(stop,))])
    assert final.finish_reason == "stop" and out_text == text[: text.index(stop)]
    t = final.timings
    assert t.arrival <= t.scheduled <= t.first_token <= t.finished and len(t.token_times) == len(toks)
    assert final.num_output_tokens == len(toks) and final.num_prompt_tokens == 2


async def test_seeded_sampling_is_reproducible_across_batches(tiny_runner):
    prompts = [[5, 6, 7]] * 3 + [[9, 9]] * 5
    params = [greedy(16, temperature=1.0, seed=42)] * 3 + [greedy(16, temperature=1.0)] * 5
    together, _ = await run_requests(tiny_runner, BatcherConfig(), prompts, params)
    alone, _ = await run_requests(tiny_runner, BatcherConfig(), prompts[:1], params[:1])
    assert together[0][0] == together[1][0] == together[2][0] == alone[0][0]


async def test_stop_drains_then_aborts(tiny_runner):
    engine = Engine(tiny_runner)
    await engine.start()
    short = await engine.add_request([5, 6], greedy(3))
    long = await engine.add_request([5, 7], greedy(100_000 // 1000 * 9))
    stopper = asyncio.create_task(engine.stop(grace_s=0.2))
    (_, _, f_short), (_, _, f_long) = await asyncio.gather(collect(short), collect(long))
    await stopper
    assert f_short.finish_reason == "length" and f_long.finish_reason in ("abort", "length")
    from batcher.engine import EngineStopped
    with pytest.raises(EngineStopped):
        await engine.add_request([5], greedy(1))


async def test_max_rps_paces_admissions(tiny_runner):
    import time
    engine = Engine(tiny_runner, BatcherConfig(max_rps=20))
    await engine.start()
    try:
        t0 = time.monotonic()
        streams = await asyncio.gather(*(engine.add_request([5, i + 3], greedy(1)) for i in range(30)))
        admitted_in = time.monotonic() - t0
        await asyncio.gather(*(collect(s) for s in streams))
        assert admitted_in >= 0.4  # 30 requests at 20/s: the last ten wait for the next second's slots
    finally:
        await engine.stop()
