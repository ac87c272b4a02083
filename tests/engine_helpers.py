"""Driving an Engine from tests: submit requests at given offsets, collect every output."""
import asyncio
import contextlib

from model_runner.kv_cache import BlockAllocator
from model_runner.sampling_params import SamplingParams

from batcher.config import BatcherConfig
from batcher.engine import Engine


@contextlib.contextmanager
def kv_blocks(runner, n):
    """Runs with only n KV blocks (to force preemption), then gives the runner its allocator back."""
    saved = runner.block_allocator
    runner.block_allocator = BlockAllocator(n, runner.block_size)
    try:
        yield runner.block_allocator
    finally:
        runner.block_allocator = saved


async def collect(stream):
    """(token ids, text, final output) of one request."""
    tokens, text = [], ""
    async for out in stream:
        tokens += out.token_ids
        text += out.text
        final = out
    return tokens, text, final


async def run_requests(runner, cfg: BatcherConfig, prompts, params, offsets=None):
    """Submits prompts[i] with params[i] at offsets[i] seconds; returns ([(tokens, text, final)], stats)."""
    engine = Engine(runner, cfg)
    await engine.start()

    async def one(i):
        await asyncio.sleep(offsets[i] if offsets else 0)
        return await collect(await engine.add_request(prompts[i], params[i]))

    try:
        results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return results, engine.stats()
    finally:
        await engine.stop()


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)
