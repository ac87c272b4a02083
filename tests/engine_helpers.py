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


async def run_requests(runner, cfg: BatcherConfig, prompts, params, offsets=None, lead: int | None = None):
    """Submits prompts[i] with params[i] at offsets[i] seconds; returns ([(tokens, text, final)], stats), the stats
    taken once every request has ended. With `lead`, that request goes first and the others' offsets count from
    its first output: its prompt is then in the prefix cache however fast the machine runs the prefill."""
    engine = Engine(runner, cfg)
    await engine.start()
    led = asyncio.Event()
    if lead is None:
        led.set()

    async def first_marked(stream):
        async for out in stream:
            led.set()
            yield out

    async def one(i):
        if i != lead:
            await led.wait()
            await asyncio.sleep(offsets[i] if offsets else 0)
        stream = await engine.add_request(prompts[i], params[i])
        return await collect(first_marked(stream) if i == lead else stream)

    try:
        results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return results, engine.stats()
    finally:
        await engine.stop()


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)
