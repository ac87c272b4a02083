"""Open-loop replay of a trace against an in-process Engine: one record per request.

Open loop means each request is sent at its arrival time whatever the engine is doing, as independent users
would send it. A closed loop (send the next when one returns) lets a slow server slow its own load down and
hides exactly the queueing that batching policies differ in.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tqdm import tqdm

from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.request import RequestOutput
from batcher.request_queue import Overloaded
from model_runner.errors import InvalidRequestError
from model_runner.sampling_params import SamplingParams

from .trace import TraceRequest, synth_prompt_ids


@dataclass
class RequestRecord:
    arrival_s: float                 # scheduled, from the trace
    submitted_s: float               # when add_request was actually called (open loop: arrival_s + a few ms)
    prompt_tokens: int
    output_tokens: int = 0           # actually generated
    finished_s: float | None = None  # when the engine finished it, seconds after the start
    queue_ms: float | None = None    # submission -> first admitted to a step
    ttft_ms: float | None = None     # submission -> first token
    total_ms: float | None = None    # submission -> last token (end to end)
    inter_token_ms: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None         # timeout, internal, or why the request was invalid
    refused: bool = False            # Overloaded at the door (HTTP 429)
    status: int | None = None        # HTTP status (None in-process)

    @property
    def ok(self) -> bool:
        return not self.refused and self.error is None and self.finished_s is not None


def prompt_ids(tokenizer, trace: list[TraceRequest], seed: int, shared_prefix: int = 0) -> list[list[int]]:
    """Token ids of every prompt, made before the clock starts so tokenizing never delays a submission."""
    return [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] if r.prompt is not None
            else synth_prompt_ids(tokenizer, r.prompt_tokens, f"{seed}:{i}", shared_prefix)
            for i, r in enumerate(trace)]


def _fill(rec: RequestRecord, final: RequestOutput, t0: float) -> None:
    t = final.timings
    rec.finish_reason, rec.error = final.finish_reason, final.error
    rec.finished_s = t.finished - t0
    rec.queue_ms, rec.ttft_ms, rec.total_ms, rec.inter_token_ms = t.queue_ms, t.ttft_ms, t.total_ms, t.inter_token_ms


async def _send(engine: Engine, req: TraceRequest, ids: list[int], t0: float) -> RequestRecord:
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - engine.clock()))  # the engine's clock: real, or simulated
    rec = RequestRecord(req.arrival_s, engine.clock() - t0, len(ids))
    try:
        stream = await engine.add_request(ids, SamplingParams(max_tokens=req.output_tokens, ignore_eos=True))
    except Overloaded:
        rec.refused = True
        return rec
    except InvalidRequestError as e:
        rec.error = str(e)
        return rec
    async for out in stream:
        rec.output_tokens += len(out.token_ids)
        if out.finished:
            _fill(rec, out, t0)
    return rec


async def replay(engine: Engine, trace: list[TraceRequest], tokenizer, seed: int = 0, progress: bool = True,
                 desc: str = "replay", shared_prefix: int = 0, ids: list[list[int]] | None = None,
                 t0: float | None = None) -> list[RequestRecord]:
    """Sends every request of the trace at its arrival time (each as its own task) to a started engine; returns
    their records in trace order once all have ended. Synthetic prompts share their first shared_prefix tokens.
    ids: the prompts, made beforehand (prompt_ids); t0: the engine clock's time of the trace's zero (default: now,
    once the prompts are made), so a caller can line other clocks up with the records."""
    if ids is None:
        ids = prompt_ids(tokenizer, trace, seed, shared_prefix)
    with tqdm(total=len(trace), desc=desc, unit="req", disable=not progress, leave=False) as bar:
        t0 = engine.clock() if t0 is None else t0
        tasks = [asyncio.create_task(_send(engine, r, p, t0)) for r, p in zip(trace, ids)]
        for task in tasks:
            task.add_done_callback(lambda _: bar.update())
        return list(await asyncio.gather(*tasks))


# Batcher knobs a benchmark may set (block_size belongs to the runner, not the batcher).
BATCHER_KNOBS = ("max_wait_ms", "max_batch_size", "max_num_batched_tokens", "max_num_seqs", "static_flush_ms")


def knobs_line(args, budget: int | None = None) -> str:
    """The batcher knobs of a report's header: each as given, else its default; an unset step budget is the
    runner's (auto), `budget` where the caller knows what auto chose."""
    defaults = BatcherConfig()
    values = {k: getattr(args, k) if getattr(args, k) is not None else getattr(defaults, k) for k in BATCHER_KNOBS}
    return ", ".join(f"{k}={'auto' + (f' = {budget}' if budget else '') if v is None else format(v, 'g')}"
                     for k, v in values.items())


def batcher_config(policy: str, knobs: dict, **settings) -> BatcherConfig:
    """A benchmark's batcher: the knobs given, and unbounded admission: a benchmark measures how long requests
    wait, so none may be refused at the door."""
    return BatcherConfig(policy=policy, max_queue=10**6, max_queued_tokens=10**12, **settings,
                         **{k: v for k, v in knobs.items() if k in BATCHER_KNOBS and v is not None})
