"""Driving an Engine from tests: submit requests at given offsets, collect every output."""
import asyncio

from model_runner.sampling_params import SamplingParams

from batcher.config import BatcherConfig
from batcher.engine import Engine


async def collect(stream):
    """(token ids, text, final output) of one request."""
    tokens, text = [], ""
    async for out in stream:
        tokens += out.token_ids
        text += out.text
        final = out
    return tokens, text, final


async def run_requests(runner, cfg: BatcherConfig, prompts, params, offsets=None):
    """Submits prompts[i] with params[i] at offsets[i] seconds; returns ([(tokens, text, final)], stats), the stats
    taken once every request has ended."""
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
