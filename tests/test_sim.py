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


def test_calibration_round_trips_into_a_simulation(tmp_path, monkeypatch):
    """--calibrate --isolated on the tiny model writes a calibration and --cost-model reads it back into a
    simulation of the same model (the in-situ default: tests/test_sim_insitu.py). The real steps run, but the calibration's clock charges each one a fixed roofline of its tokens
    and sequences: the fit then sees timings that grow with the work whatever the machine's load (a busy
    machine's real timings of a quick grid need not, and the fit rightly refuses those)."""
    import time as real_time
    from types import SimpleNamespace

    import sim.calibrate
    from model_runner.runner import ModelRunner
    from sim.simulate import main
    now, execute = [0.0], ModelRunner.execute

    def charged(self, scheduled):
        out = execute(self, scheduled)
        now[0] += 2e-3 + 5e-5 * sum(n for _, n in scheduled) + 3e-4 * len(scheduled)
        return out

    monkeypatch.setattr(ModelRunner, "execute", charged)
    fake_time = SimpleNamespace(perf_counter=lambda: now[0], strftime=real_time.strftime)
    monkeypatch.setattr(sim.calibrate, "time", fake_time)
    cal = tmp_path / "cal.json"
    assert main(["--calibrate", "--isolated", "--quick-calibration", "--model", "tiny-random", "--dtype", "float32",
                 "--cost-model", str(cal), "--no-progress"]) == 0
    assert main(["--cost-model", str(cal), "--policies", "continuous", "--num-requests", "5", "--prompt-len", "8,32",
                 "--output-len", "2,6", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    with pytest.raises(SystemExit) as refused:   # an all-reduce needs a device's link to price it
        main(["--cost-model", str(cal), "--tp", "2"])
    assert refused.value.code == 2


# --- recordings: `jitney simulate --record-steps` writes what `jitney bench --record-steps` writes ---------------

def _schema(path) -> dict[str, set]:
    """Each event type's keys (and the kv map's) in a recording."""
    import json
    out: dict[str, set] = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        out.setdefault(e["type"], set()).update(e)
        if "kv" in e:
            out.setdefault("kv", set()).update(e["kv"])
    return out


def test_simulate_records_steps_that_the_view_replays(tmp_path, tiny_runner):
    """A tiny simulation over two policies writes one recording: a hello per run (labelled by its policy), step
    events in simulated seconds, and a closing state; `jitney view`'s loader accepts it and shows both runs side
    by side; every event type has the keys the bench's recording (its own writer, on the real tiny model) has."""
    from api.view import panes, read_runs
    from batcher.step_view import StepRecorder
    from benchmarks.targets import run_policy
    from benchmarks.trace import burst
    from sim.simulate import run_simulate

    sim_rec = tmp_path / "sim.jsonl"
    result = run_simulate(["--device", "h100-sxm", "--model", "story-6b", "--policies", "static,continuous",
                           "--num-requests", "6", "--rate", "20", "--prompt-len", "16,64", "--output-len", "4,8",
                           "--out", str(tmp_path / "out"), "--no-progress", "--record-steps", str(sim_rec)])
    runs = read_runs(str(sim_rec))
    assert [label for label, _ in runs] == ["static", "continuous"]
    assert [label for label, _ in panes([str(sim_rec)])] == ["static", "continuous"]
    import json
    for (label, lines), run in zip(runs, result["runs"]):
        events = [json.loads(x) for x in lines]
        assert events[0]["type"] == "hello" and events[-1]["type"] == "state"
        steps = [e for e in events if e["type"] == "step"]
        assert steps and [e["n"] for e in steps] == list(range(1, len(steps) + 1))
        assert sum(e["sampled"] for e in steps) == run["summary"]["output_tokens"]
        assert all(e["t"] <= run["summary"]["simulated_s"] + 1e-6 for e in steps)   # simulated seconds from 0

    bench_rec = tmp_path / "bench.jsonl"
    with open(bench_rec, "w") as f:
        recorder = StepRecorder(f)
        trace = burst(3, (8, 16), (2, 4))
        ids = [[5 + i] * r.prompt_tokens for i, r in enumerate(trace)]
        asyncio.run(run_policy(tiny_runner, batcher_config("continuous", {}), trace, progress=False, ids=ids,
                               recorder=recorder, label="continuous"))
    assert _schema(sim_rec) == _schema(bench_rec)


# --- the review's fixes: all-reduce dtype, TF32, per-device cost, per-step overhead --------------------------

def test_allreduce_is_priced_in_the_compute_dtypes_element_size():
    """A ring all-reduce of a step's activations: hidden_size elements per token in the compute dtype (4 bytes in
    float32 and tf32, 2 in bfloat16), two per layer, each 2 (tp - 1) / tp of the message over the link."""
    from sim.models import STORY_6B, sheet_model
    from sim.hardware import ALLREDUCE_LATENCY_S, LINK_EFFICIENCY, device
    link = device("a100-80gb").link * LINK_EFFICIENCY
    for dtype, size in (("float32", 4), ("tf32", 4), ("bfloat16", 2), ("float16", 2)):
        stored = "float32" if dtype == "tf32" else dtype
        cost, _ = sheet_model(STORY_6B, "story-6b", "a100-80gb", dtype, stored, stored, 4, 16, 2**30, 0.0, 0.0)
        one = 2 * 3 / 4 * 100 * 4096 * size / link + ALLREDUCE_LATENCY_S
        assert cost.allreduce_s(100) == pytest.approx(2 * 28 * one)
    # int8 weights compute in their float dtype: the all-reduce is bfloat16's
    cost, _ = sheet_model(STORY_6B, "story-6b", "a100-80gb", "bfloat16", "int8", "bfloat16", 2, 16, 2**30, 0.0, 0.0)
    assert cost.work.activation_bytes == 2


def test_float32_is_priced_at_fp32_and_tf32_only_when_asked(tmp_path):
    """float32 matmuls get the sheet's CUDA-core FP32 peak; --dtype tf32 the tensor cores' TF32 peak (dense),
    with float32 weights and KV cache; a calibrated host has no tf32 to time."""
    from sim.hardware import DEVICES
    from sim.simulate import build_model, parse_args
    assert DEVICES["a100-80gb"].flops["float32"] == 19.5e12 and DEVICES["a100-80gb"].flops["tf32"] == 156e12
    assert DEVICES["h100-sxm"].flops["tf32"] == 494.5e12
    assert all(d.flops["float32"] < d.flops["tf32"] <= d.flops["bfloat16"] for d in DEVICES.values())
    base = ["--num-requests", "2", "--kv-cache-memory", "1GiB"]
    f32, _, _, _ = build_model(parse_args([*base, "--dtype", "float32"]), 16)
    tf32, _, _, _ = build_model(parse_args([*base, "--dtype", "tf32"]), 16)
    assert f32.peak_flops == 19.5e12 and tf32.peak_flops == 156e12
    assert tf32.work.weight_bytes == f32.work.weight_bytes and tf32.work.kv_bytes_per_token == f32.work.kv_bytes_per_token
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "tf32", "--cost-model", str(tmp_path / "cal.json")])


def test_hourly_cost_is_per_device_and_tp_multiplies_it(tmp_path):
    """--hourly-cost is USD per device-hour (as sim/prices.py and jitney plan count): --tp 4 costs 4 x it."""
    from sim.simulate import build_parser, parse_args, run_simulate
    args = parse_args(["--hourly-cost", "5", "--tp", "4"])
    assert args.device_hourly_cost == 5 and args.hourly_cost == 20
    assert "ONE device" in build_parser().format_help()
    result = run_simulate(["--device", "a100-80gb", "--model", "story-6b", "--policies", "continuous", "--tp", "2",
                           "--num-requests", "4", "--rate", "20", "--prompt-len", "16,32", "--output-len", "4,8",
                           "--hourly-cost", "3", "--out", str(tmp_path), "--no-progress"])
    s = result["runs"][0]["summary"]
    assert s["cost_per_mtok"] == pytest.approx(6 / (s["output_tok_s"] * 3600) * 1e6)
    assert "$3/hour x 2 devices = $6/hour" in (tmp_path / "report.md").read_text()


def test_sheet_devices_pay_a_documented_step_overhead_by_default():
    """A sheet device's step costs its roofline time plus STEP_OVERHEAD_S (2 ms, assumed) unless
    --step-overhead-ms says otherwise; the description says which."""
    from sim.cost import StepPlan
    from sim.hardware import STEP_OVERHEAD_S
    from sim.simulate import build_model, parse_args
    assert STEP_OVERHEAD_S == 2e-3
    plan = StepPlan((), (100,) * 4, 4)
    base = ["--num-requests", "2", "--kv-cache-memory", "1GiB"]
    default, _, _, _ = build_model(parse_args(base), 16)
    zero, _, _, _ = build_model(parse_args([*base, "--step-overhead-ms", "0"]), 16)
    five, _, _, _ = build_model(parse_args([*base, "--step-overhead-ms", "5"]), 16)
    assert default.params.step_s == STEP_OVERHEAD_S and zero.params.step_s == 0.0
    assert default.cost(plan).seconds - zero.cost(plan).seconds == pytest.approx(STEP_OVERHEAD_S)
    assert five.cost(plan).seconds - zero.cost(plan).seconds == pytest.approx(5e-3)
    assert "+ 2 ms per step" in default.description
