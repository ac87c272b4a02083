"""In-situ calibration: the real Engine serves a short workload on this host, and every step it runs is a sample.

The isolated grid (calibrate.py's GRID) times runner.execute on hand-built steps, each alone and repeated. What
the simulator stands in for is the engine's step as it runs in a server: handed to the torch thread by
run_in_executor while the event loop does its own work beside it (the clients reading their streams), then the
engine's host work after it (applying the sampled tokens, emitting them, planning the next step), for which the
simulator's virtual clock charges nothing. So here the real Engine, on the process's torch thread as `jitney
serve` and `jitney bench --in-process` run it, replays a few short traces (WORKLOAD) chosen to cover the range a
simulation asks about: decode batches of 1 to 64 at contexts from 33 to ~1,000 tokens, prompt chunks of 16 to
512 tokens (alone, several in a step, and after a cached prefix), and steps that mix chunks with decodes
(staggered arrivals under continuous batching, static batches). A StepSampler on the engine's step watchers
(the hook `--record-steps` and the dashboard use: batcher/stats.py Counters.step_watchers) records every step's
plan, exactly as the scheduler produced it and the runner received it, and its seconds:

    step_s   the engine's own measure (StepRecord.seconds): from handing the step over to its result back
    host_s   from then until the engine's loop next yields (it has applied and emitted the step's tokens and
             handed over the next step, or gone idle): 0.2-1.2 ms on the development machine, ~16 us per
             sequence

A sample's seconds are their sum: the time the engine was occupied by that step, which is what the simulator
charges a step. calibrate.py fits the cost model to them.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from batcher.clock import REAL_CLOCK, Clock
from batcher.engine import Engine
from benchmarks.replay import batcher_config, prompt_ids, replay
from benchmarks.sysmon import CpuMonitor
from benchmarks.trace import TraceRequest

from .cost import StepPlan


@dataclass(frozen=True)
class Phase:
    """One trace the engine serves, on a fresh Engine (an empty prefix cache), under one policy."""
    name: str
    trace: tuple[TraceRequest, ...]
    policy: str = "continuous"
    shared_prefix: int = 0   # tokens every prompt of the phase shares (prefix-cache hits: chunks after a prefix)


def requests(n: int, prompt: int, output: int, every_s: float = 0.0, start_s: float = 0.0) -> tuple[TraceRequest, ...]:
    """n requests of prompt tokens generating output tokens, arriving every_s apart from start_s."""
    return tuple(TraceRequest(round(start_s + i * every_s, 6), prompt, output) for i in range(n))


# Untimed first: oneDNN picks its kernels on the first sight of a shape (as the bench's warm_up_trace).
WARM_UP = Phase("warm-up", requests(4, 256, 8))
# ~320 steps, about a minute on the development machine (2-core AMD EPYC Zen 4, SmolLM2-135M in bfloat16).
# Decode batches are bursts: their prompts are prefilled together (several chunks a step, and the step where the
# last chunk runs beside the first decodes), then every sequence decodes together, the batch shrinking at the end
# (all share one output length, so those prefilled last end last). Single requests give prompt chunks alone and
# batch-1 decodes.
WORKLOAD = (
    *(Phase(f"decode x{n}, prompts of 32", requests(n, 32, 12)) for n in (1, 2, 4, 8, 16, 24, 32, 48, 64)),
    *(Phase(f"decode x{n}, prompts of 256", requests(n, 256, 12)) for n in (1, 4, 16)),
    Phase("decode x4, prompts of 1,000 (chunks after a cached part)", requests(4, 1000, 10)),
    *(Phase(f"a prompt of {p}, twice", requests(2, p, 3, every_s=0.8)) for p in (16, 32, 64, 128, 256, 512)),
    Phase("a shared 256-token prefix", requests(6, 300, 6, every_s=0.05), shared_prefix=256),
    Phase("staggered arrivals (chunks beside decodes)", requests(24, 96, 24, every_s=0.08)),
    Phase("static batches", requests(24, 64, 24, every_s=0.08), policy="static"),
)
# A few seconds: tests and --quick-calibration.
QUICK_WORKLOAD = (
    Phase("decode x1", requests(1, 16, 6)),
    Phase("decode x8", requests(8, 24, 6)),
    Phase("a prompt of 96", requests(1, 96, 2)),
    Phase("staggered arrivals", requests(6, 40, 6, every_s=0.02)),
)


@dataclass
class StepSample:
    phase: str
    plan: StepPlan
    start: float           # on the engine's clock
    step_s: float          # the engine's measure of the step (StepRecord.seconds)
    host_s: float = 0.0    # the engine's work after it, until its loop next yielded
    idle_after: bool = False  # the engine had nothing left to run then (it waited for arrivals)
    others_cpu: float | None = None  # % of the machine's CPUs other processes used during the step's phase

    @property
    def seconds(self) -> float:
        return self.step_s + self.host_s


@dataclass
class StepSampler:
    """Watches an engine's steps (Counters.step_watchers): one StepSample per step, its plan taken as the
    runner received it (the watcher runs before the step's tokens are applied, so no Sequence has moved)."""
    phase: str = ""
    samples: list[StepSample] = field(default_factory=list)

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.counters.step_watchers.append(self._watch)

    def detach(self) -> None:
        self._engine.counters.step_watchers.remove(self._watch)

    def _watch(self, engine: Engine, plan, sampled, t0: float, seconds: float) -> None:
        sample = StepSample(self.phase, StepPlan.of(plan.scheduled), t0, seconds)
        self.samples.append(sample)
        # The engine's loop runs on without yielding until it has handed the next step to its executor (or has
        # nothing to run and waits): a callback queued now runs at that moment, first in the loop's queue.
        asyncio.get_running_loop().call_soon(self._host_done, engine, sample, t0 + seconds)

    @staticmethod
    def _host_done(engine: Engine, sample: StepSample, step_end: float) -> None:
        sample.host_s = max(0.0, engine.clock() - step_end)
        sample.idle_after = not engine.scheduler.has_work()


# A phase during which other processes used more than BUSY_PCT % of the machine's CPUs is served again (after a
# pause), up to RETRIES times, and the quietest attempt kept: on a shared machine another tenant's burst can slow
# a 22 ms decode to 1-2 s.
BUSY_PCT, RETRIES, RETRY_PAUSE_S = 10.0, 2, 5.0


async def serve(runner, phase: Phase, seed: int, clock: Clock) -> tuple[list[StepSample], float | None]:
    """One phase on a fresh Engine: its steps, and the % of the machine's CPUs other processes used meanwhile (the
    machine's use less this process's; None where /proc cannot tell)."""
    engine = Engine(runner, batcher_config(phase.policy, {}), clock=clock)
    sampler = StepSampler(phase.name)
    await engine.start()
    sampler.attach(engine)
    trace = list(phase.trace)
    ids = prompt_ids(runner.tokenizer, trace, seed=seed, shared_prefix=phase.shared_prefix)
    try:
        with CpuMonitor(os.getpid()) as cpu:
            records = await replay(engine, trace, runner.tokenizer, progress=False, ids=ids)
    finally:
        sampler.detach()
        await engine.stop()
    if failed := [r for r in records if not r.ok]:
        raise RuntimeError(f"calibration phase {phase.name!r}: {len(failed)} requests failed "
                           f"({failed[0].error or failed[0].finish_reason})")
    others = None if cpu.cpu_pct is None or cpu.process_pct is None else max(0.0, cpu.cpu_pct - cpu.process_pct)
    for sample in sampler.samples:
        sample.others_cpu = others
    return sampler.samples, others


async def collect(runner, phases=WORKLOAD, warm_up: bool = True, progress: bool = False,
                  clock: Clock | None = None, retries: int = RETRIES) -> list[StepSample]:
    """Every step the engine runs while serving each phase in turn (a fresh Engine on `runner` for each), a phase
    served again when other processes were busy on the CPUs meanwhile (on the real clock only: nothing disturbs a
    virtual one). clock: the engine's (default: the real one; on sim/loop.py's VirtualLoop, the loop's, as tests
    run it)."""
    if clock is None:
        clock = getattr(asyncio.get_running_loop(), "clock", REAL_CLOCK)
    samples: list[StepSample] = []
    for i, phase in enumerate(([WARM_UP] if warm_up else []) + list(phases)):
        best: tuple[list[StepSample], float | None] | None = None
        for attempt in range(retries + 1):
            wall = time.perf_counter()
            steps, others = await serve(runner, phase, i, clock)
            if best is None or (others is not None and best[1] is not None and others < best[1]):
                best = steps, others
            again = (others is not None and others > BUSY_PCT and attempt < retries and clock is REAL_CLOCK
                     and phase is not WARM_UP)
            if progress:
                print(f"  {phase.name}: {len(steps)} steps, {time.perf_counter() - wall:.1f} s"
                      + (" (untimed)" if phase is WARM_UP else "")
                      + (f"; other processes used {others:.0f} % of the CPUs" if others and others >= 5 else "")
                      + ("; again after a pause" if again else ""), flush=True)
            if not again:
                break
            await asyncio.sleep(RETRY_PAUSE_S)
        if phase is not WARM_UP:
            samples += best[0]  # the quietest attempt's
    return samples


def run_loop(coro):
    """How calibrate.calibrate() runs collect(): a plain asyncio loop on this thread (the engine's steps go to the
    process's torch thread, as in a server). Tests put sim/loop.py's run_virtual here."""
    return asyncio.run(coro)
