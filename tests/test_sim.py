"""The simulation runs jitney's own scheduler: with a fixed step-cost model, a workload's simulated schedule is
exactly the schedule of the real engine (the real tiny model computing) when each step takes that modelled time.

Both sides run the same Engine on the virtual-time loop (sim/loop.py): the real side's runner is the real
ModelRunner with its step charged the modelled seconds (ChargedRunner), the simulated side's is SimRunner, which
computes nothing. Virtual time makes the real side deterministic (no sleep granularity, no machine speed), so
the comparison is exact: every step's members, chunk sizes and start time, the preemptions, every request's
timings. A real-loop run on a burst (whose schedule no timing can change) checks the loop itself.
"""
import asyncio
from dataclasses import asdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.config import POLICIES
from batcher.engine import Engine
from benchmarks.replay import batcher_config, replay
from benchmarks.trace import TraceRequest
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence
from sim.cost import RooflineCost, RooflineParams, Work
from sim.loop import VirtualClock, VirtualLoop, run_virtual
from sim.runner import ChargedRunner, SimRunner

# Rates of the order of the tiny model's work, so a step lasts milliseconds and arrivals land inside steps.
PARAMS = RooflineParams(flops_per_s=2e8, bytes_per_s=4e8, step_s=2e-3, seq_s=3e-4)


class Recording:
    """Records each step's members as (sequence number within the run, tokens fed, tokens computed before)."""

    def __init__(self, inner, base: int):
        self.inner, self.base, self.steps = inner, base, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, scheduled):
        self.steps.append([(s.seq_id - self.base, n, s.num_computed_tokens) for s, n in scheduled])
        return self.inner.execute(scheduled)


def cost_model(runner):
    return RooflineCost(Work(runner.model_config, "float32", "float32"), PARAMS, PARAMS.flops_per_s,
                        PARAMS.bytes_per_s, "test")


def next_seq_id() -> int:
    return Sequence([1], SamplingParams()).seq_id + 1


async def _run(make_runner, cfg, trace, ids):
    clock = asyncio.get_running_loop().clock if isinstance(asyncio.get_running_loop(), VirtualLoop) else None
    runner = Recording(make_runner(clock), next_seq_id())
    engine = Engine(runner, cfg, record_steps=True, **({"clock": clock} if clock else {}))
    await engine.start()
    try:
        records = await replay(engine, trace, None, progress=False, ids=ids)
    finally:
        await engine.stop()
    return runner.steps, [asdict(s) for s in engine.step_log], [asdict(r) for r in records], engine.stats()


def sim_runner(real, clock):
    mc = real.model_config
    return SimRunner(mc, cost_model(real), clock, real.num_blocks, real.block_size, real.max_model_len)


workloads = st.integers(1, 7).flatmap(lambda n: st.tuples(
    st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.3)), min_size=n, max_size=n),   # arrivals
    st.lists(st.integers(1, 70), min_size=n, max_size=n),                               # prompt lengths
    st.lists(st.integers(1, 12), min_size=n, max_size=n),                               # output lengths
    st.lists(st.sampled_from([0, 16, 32]), min_size=n, max_size=n),                     # shared prefix
))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workload=workloads, policy=st.sampled_from(POLICIES), seqs=st.integers(1, 4),
       tokens=st.sampled_from([8, 24, 64]), blocks=st.integers(3, 12), wait_ms=st.sampled_from([0.0, 2.0, 30.0]),
       prefix=st.booleans())
def test_simulated_schedule_is_the_real_engines(tiny_runner, workload, policy, seqs, tokens, blocks, wait_ms,
                                                prefix):
    arrivals, prompts, outputs, shared = workload
    trace = sorted((TraceRequest(round(a, 4), p, o) for a, p, o in zip(arrivals, prompts, outputs)),
                   key=lambda r: r.arrival_s)
    common = [(7 * i) % 300 + 5 for i in range(32)]  # a shared system prompt; the rest differs per request
    ids = [(common[:k] + [(31 * i + 3 * j) % 300 + 5 for j in range(r.prompt_tokens)])[:r.prompt_tokens]
           for i, (r, k) in enumerate(zip(trace, shared))]
    cfg = batcher_config(policy, dict(max_num_seqs=seqs, max_batch_size=seqs, max_num_batched_tokens=tokens,
                                      max_wait_ms=wait_ms, static_flush_ms=40.0),
                         num_kv_blocks=blocks, enable_prefix_caching=prefix)
    real = run_virtual(_run(lambda clock: ChargedRunner(tiny_runner, cost_model(tiny_runner), clock), cfg, trace,
                            ids))
    sim = run_virtual(_run(lambda clock: sim_runner(tiny_runner, clock), cfg, trace, ids))
    assert real[0] == sim[0]    # every step's members and chunks
    assert real[1] == sim[1]    # step starts, lengths, waiting, preemptions, KV blocks in use
    assert real[2] == sim[2]    # every request's timings, lengths and end
    assert real[3] == sim[3]    # the engine's counters (prefix-cache hits, preemptions, reasons)


@pytest.mark.parametrize("policy", POLICIES)
def test_virtual_loop_schedules_a_burst_as_the_real_loop_does(tiny_runner, policy):
    """All requests at t=0: no timing can change this schedule, so the real engine on the real loop (the real
    clock, the step thread) must produce the very steps the simulation does."""
    trace = [TraceRequest(0.0, p, o) for p, o in ((40, 5), (9, 12), (70, 3), (23, 8), (16, 6))]
    ids = [[(13 * i + j) % 300 + 5 for j in range(r.prompt_tokens)] for i, r in enumerate(trace)]
    cfg = batcher_config(policy, dict(max_num_seqs=3, max_batch_size=3, max_num_batched_tokens=32,
                                      max_wait_ms=20.0, static_flush_ms=20.0), num_kv_blocks=8)
    real = asyncio.run(_run(lambda clock: tiny_runner, cfg, trace, ids))
    sim = run_virtual(_run(lambda clock: sim_runner(tiny_runner, clock), cfg, trace, ids))
    assert real[0] == sim[0]
    assert [r["output_tokens"] for r in real[2]] == [r["output_tokens"] for r in sim[2]] == [5, 12, 3, 8, 6]
    assert real[3].preemptions == sim[3].preemptions


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workload=workloads, policy=st.sampled_from(POLICIES), wait_ms=st.sampled_from([2.0, 30.0]),
       timeout_s=st.sampled_from([None, 0.05]))
def test_the_batcher_reads_only_its_clock(tiny_runner, workload, policy, wait_ms, timeout_s):
    """The same workload on a virtual clock that starts at 0 and at 4096 s gives the same steps, shifted: a time
    stamp, window or deadline read from anywhere but the engine's clock would see a different offset. Times
    agree to 1e-6 (of a second or a millisecond, as the field is): adding 4096 rounds a duration's last bits
    away (float64's ulp at 4096 is 9e-13 s, a few additions per time stamp, a 1000x for milliseconds), and
    windows and steps are milliseconds, so no decision sits within that distance."""
    arrivals, prompts, outputs, _ = workload
    trace = sorted((TraceRequest(round(a, 4), p, o) for a, p, o in zip(arrivals, prompts, outputs)),
                   key=lambda r: r.arrival_s)
    ids = [[(31 * i + j) % 300 + 5 for j in range(r.prompt_tokens)] for i, r in enumerate(trace)]
    cfg = batcher_config(policy, dict(max_num_seqs=3, max_batch_size=3, max_num_batched_tokens=24,
                                      max_wait_ms=wait_ms, static_flush_ms=40.0), num_kv_blocks=6,
                         timeout_s=timeout_s)
    runs = [run_virtual(_run(lambda clock: sim_runner(tiny_runner, clock), cfg, trace, ids), VirtualClock(start))
            for start in (0.0, 4096.0)]
    (steps0, log0, rec0, stats0), (steps1, log1, rec1, stats1) = runs
    assert steps0 == steps1 and stats0 == stats1
    assert close(rec0, rec1) and close(log0, [dict(s, start=s["start"] - 4096.0) for s in log1])


def close(a, b, tol: float = 1e-6) -> bool:
    """Equal, floats within tol (nested dicts and lists)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b
