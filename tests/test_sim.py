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
    """All requests at t=0 and no window (a window of 3 with 5 waiting would release the last 2 at whichever
    step boundary follows the window's end, which real step times decide): no timing can change this schedule,
    so the real engine on the real loop (the real clock, the step thread) must produce the simulation's steps."""
    trace = [TraceRequest(0.0, p, o) for p, o in ((40, 5), (9, 12), (70, 3), (23, 8), (16, 6))]
    ids = [[(13 * i + j) % 300 + 5 for j in range(r.prompt_tokens)] for i, r in enumerate(trace)]
    cfg = batcher_config(policy, dict(max_num_seqs=3, max_batch_size=3, max_num_batched_tokens=32,
                                      max_wait_ms=0.0, static_flush_ms=0.0), num_kv_blocks=8)
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


# --- the cost model and the command ---------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(flops_per_s=st.floats(1e9, 1e15), ridge=st.floats(0.5, 500), step_s=st.floats(0, 0.05),
       seq_s=st.floats(0, 1e-3), seed=st.integers(0, 2**32 - 1))
def test_a_fit_recovers_the_parameters_of_synthetic_steps(flops_per_s, ridge, step_s, seq_s, seed):
    """Steps timed exactly by a known roofline, on both sides of its ridge: fit() finds it again. Tolerances:
    the ridge comes from a golden-section search whose error is of the order of sqrt(float64's epsilon), 1e-8,
    at the flat bottom of a least-squares valley: rates within 1e-5, and the terms within 1e-6 of the longest
    step (a rate's error times a step's work)."""
    import numpy as np

    from sim.cost import fit
    rng = np.random.default_rng(seed)
    nbytes = 10 ** rng.uniform(6, 10, 40)
    flops = nbytes * ridge * 10 ** rng.uniform(-1.5, 1.5, 40)   # intensities spanning the ridge
    seqs = rng.integers(1, 128, 40)
    seconds = np.maximum(flops / flops_per_s, nbytes * ridge / flops_per_s) + step_s + seq_s * seqs
    got = fit(flops, nbytes, seqs, seconds)
    assert got.flops_per_s == pytest.approx(flops_per_s, rel=1e-5)
    assert got.bytes_per_s == pytest.approx(flops_per_s / ridge, rel=1e-5)
    assert got.step_s == pytest.approx(step_s, abs=1e-6 * seconds.max())
    assert got.seq_s == pytest.approx(seq_s, abs=1e-6 * seconds.max())


def test_work_counts_a_decode_as_the_roofline_docs_do(tiny_runner):
    """A batch of decodes: the FLOPs and bytes benchmarks/cost.py gives, and tensor parallelism divides them."""
    from benchmarks.cost import decode_step_cost
    from sim.cost import StepPlan
    mc = tiny_runner.model_config
    flops, nbytes = decode_step_cost(mc, 8, 100, 4)
    work = Work(mc, "float32", "float32")
    plan = StepPlan((), (100,) * 8, 8)
    assert work.flops(plan) == pytest.approx(flops)
    # decode_step_cost reads each sequence's context; Work also writes the step's new K/V (one token each).
    assert work.bytes(plan) == pytest.approx(nbytes + 8 * mc.kv_bytes_per_token_per_element * 4)
    assert Work(mc, "float32", "float32", tp=2).flops(plan) == pytest.approx(flops / 2)


def test_simulate_smoke_on_a_named_device(tmp_path):
    """`jitney simulate` end to end: a small Poisson workload, story-6b on an H100, two policies; the report's
    tables and plots are written, every request completes, and utilisation stays within the device's peaks."""
    from sim.simulate import run_simulate
    result = run_simulate(["--device", "h100-sxm", "--model", "story-6b", "--policies", "sequential,continuous",
                           "--num-requests", "12", "--rate", "20", "--prompt-len", "16,64", "--output-len", "4,16",
                           "--out", str(tmp_path), "--no-progress"])
    assert {p.name for p in tmp_path.iterdir()} >= {"report.md", "results.json", "timeline.png", "latency_cdf.png",
                                                    "utilisation.png"}
    runs = {r["label"]: r["summary"] for r in result["runs"]}
    assert all(s["completed"] == 12 for s in runs.values())
    assert all(0 < s["flops_util"] <= 1 and 0 < s["bandwidth_util"] <= 1 for s in runs.values())
    assert runs["continuous"]["mean_batch"] > runs["sequential"]["mean_batch"] == 1
    assert "SIMULATED" in (tmp_path / "report.md").read_text()


def test_calibration_round_trips_into_a_simulation(tmp_path):
    """--calibrate on the tiny model writes a calibration (its figures are this machine's, not checked), and
    --cost-model reads it back into a simulation of the same model."""
    from sim.simulate import main
    cal = tmp_path / "cal.json"
    # The fit refuses timings that do not grow with the work, which a busy machine can give a quick grid: try
    # again (a real calibration does not repeat that by chance three times).
    assert any(main(["--calibrate", "--quick-calibration", "--model", "tiny-random", "--dtype", "float32",
                     "--cost-model", str(cal), "--no-progress"]) == 0 for _ in range(3))
    assert main(["--cost-model", str(cal), "--policies", "continuous", "--num-requests", "5", "--prompt-len", "8,32",
                 "--output-len", "2,6", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    with pytest.raises(SystemExit) as refused:   # an all-reduce needs a device's link to price it
        main(["--cost-model", str(cal), "--tp", "2"])
    assert refused.value.code == 2
