"""In-situ calibration (sim/insitu.py, sim/calibrate.py): the steps it reads are the steps the engine ran, and its
fit recovers a known cost model from them. Nothing here is timed: the engines run on the virtual clock (sim/loop.py)
with each step charged a known cost, or, on the real loop, only the plans are compared."""
import asyncio

import pytest

from model_runner.runner import ModelRunner
from sim import insitu
from sim.calibrate import fit_in_situ, in_situ_samples, shape_cell
from sim.cost import RooflineCost, RooflineParams, SpreadCost, StepPlan, Work
from sim.loop import run_virtual
from sim.runner import ChargedRunner, SimRunner


class PlanRecorder:
    """A runner that records each step's plan as it receives it (what the scheduler produced), then runs it."""

    def __init__(self, inner):
        self.inner, self.plans = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, scheduled):
        self.plans.append(StepPlan.of(scheduled))
        return self.inner.execute(scheduled)


def roofline(mc, params: RooflineParams) -> RooflineCost:
    return RooflineCost(Work(mc, "float32", "float32"), params, params.flops_per_s, params.bytes_per_s, "test")


# Every policy's steps, a prompt chunked after a cached part, a shared prefix, arrivals inside steps.
PHASES = (*insitu.QUICK_WORKLOAD,
          insitu.Phase("static batches", insitu.requests(5, 20, 4, every_s=0.003), policy="static"),
          insitu.Phase("sequential", insitu.requests(3, 12, 3), policy="sequential"),
          insitu.Phase("chunked", insitu.requests(2, 600, 2)),
          insitu.Phase("shared prefix", insitu.requests(3, 40, 2, every_s=0.004), shared_prefix=32))


def test_the_samples_are_the_steps_the_engine_ran(tiny_runner):
    """On the virtual clock, the real tiny model computing and each step charged a known roofline: one sample per
    step the runner received, with the scheduler's plan (chunks and their contexts, decode contexts, sampled
    rows), the charged seconds as the step's, no host time (nothing else advances a virtual clock), and the
    engine idle after the last step of each phase."""
    params = RooflineParams(flops_per_s=2e8, bytes_per_s=4e8, step_s=2e-3, seq_s=3e-4)
    cost = roofline(tiny_runner.model_config, params)
    runs = []
    for _ in range(2):
        recorder = []

        async def main():
            runner = PlanRecorder(ChargedRunner(tiny_runner, cost, asyncio.get_running_loop().clock))
            recorder.append(runner)
            return await insitu.collect(runner, PHASES, warm_up=False)
        samples = run_virtual(main())
        plans = recorder[0].plans
        assert [s.plan for s in samples] == plans
        # (the engine's clock difference: the charge, to the last bits a subtraction of start times loses)
        assert [s.step_s for s in samples] == pytest.approx([cost.cost(p).seconds for p in plans], rel=1e-9)
        assert all(s.host_s == 0.0 for s in samples)
        assert list(dict.fromkeys(s.phase for s in samples)) == [p.name for p in PHASES]
        last = {s.phase: i for i, s in enumerate(samples)}
        assert all(samples[i].idle_after for i in last.values())
        assert not all(s.idle_after for s in samples)
        assert any(p.prefill and p.decode for p in plans)                 # mixed steps
        assert any(n < ctx for p in plans for n, ctx in p.prefill)        # a chunk after a cached part
        runs.append([(s.phase, s.plan, s.start, s.step_s) for s in samples])
    assert runs[0] == runs[1]  # deterministic


def test_the_samples_match_the_engines_plans_on_the_real_loop(tiny_runner):
    """The production path: the real loop, the real clock, steps on the torch thread. Timings are whatever the
    machine gives (only their signs are checked); the plans are exactly those the runner received."""
    async def main():
        runner = PlanRecorder(tiny_runner)
        return runner, await insitu.collect(runner, insitu.QUICK_WORKLOAD[:2], warm_up=False, retries=0)
    runner, samples = asyncio.run(main())
    assert [s.plan for s in samples] == runner.plans and len(samples) > 5
    assert all(s.step_s > 0 and s.host_s >= 0 and s.seconds == s.step_s + s.host_s for s in samples)


@pytest.mark.parametrize("params", [
    RooflineParams(flops_per_s=2e9, bytes_per_s=1e8, step_s=4e-3, seq_s=2e-4, attention_s_per_flop=3e-9),
    RooflineParams(flops_per_s=5e9, bytes_per_s=5e7, step_s=1e-2, seq_s=0.0, attention_s_per_flop=0.0),
    RooflineParams(flops_per_s=1e9, bytes_per_s=2e8, step_s=0.0, seq_s=5e-4, attention_s_per_flop=1e-9),
])
def test_an_in_situ_fit_recovers_the_parameters(tiny_runner, params):
    """The whole calibration workload served by the engine on the virtual clock, with a SimRunner charging a
    known cost model (the tiny model's shape, ridges inside the workload's intensities): the in-situ fit (its
    weights and its outlier rule included) finds the parameters again, and keeps every step (none is off).
    Tolerances as test_sim's synthetic fit: the ridge comes from a golden-section search."""
    mc = tiny_runner.model_config
    cost = roofline(mc, params)
    work = cost.work

    async def main():
        runner = SimRunner(mc, cost, asyncio.get_running_loop().clock, num_blocks=4096, block_size=16)
        return await insitu.collect(runner, insitu.WORKLOAD)
    samples = in_situ_samples(run_virtual(main()), work)
    plans = [StepPlan.from_dict(s["plan"]) for s in samples]
    assert len({shape_cell(p) for p in plans}) > 20
    ridge = params.flops_per_s / params.bytes_per_s
    intensity = [work.flops(p) / work.bytes(p) for p in plans]
    assert min(intensity) < ridge < max(intensity)  # both sides of the roofline are seen
    got, weights, keep = fit_in_situ(samples)
    assert keep.all()
    longest = max(s["seconds"] for s in samples)
    assert got.flops_per_s == pytest.approx(params.flops_per_s, rel=1e-5)
    assert got.bytes_per_s == pytest.approx(params.bytes_per_s, rel=1e-5)
    assert got.step_s == pytest.approx(params.step_s, abs=1e-6 * longest)
    assert got.seq_s == pytest.approx(params.seq_s, abs=1e-6 * longest)
    assert got.attention_s_per_flop * max(s["attention_flops"] for s in samples) == pytest.approx(
        params.attention_s_per_flop * max(s["attention_flops"] for s in samples), abs=1e-6 * longest)


def test_the_fit_weighs_each_shape_alike_and_leaves_out_disturbed_steps(tiny_runner):
    """Steps from a known roofline, a few of them disturbed (3x their time): the fit leaves exactly those out and
    recovers the rest's parameters; within a shape cell the weights are 1 / t^2 shared by the cell's steps."""
    mc = tiny_runner.model_config
    params = RooflineParams(flops_per_s=2e9, bytes_per_s=1e8, step_s=4e-3, seq_s=2e-4)
    cost = roofline(mc, params)

    async def main():
        runner = SimRunner(mc, cost, asyncio.get_running_loop().clock, num_blocks=4096, block_size=16)
        return await insitu.collect(runner, insitu.WORKLOAD[:12])
    samples = in_situ_samples(run_virtual(main()), cost.work)
    disturbed = set(range(3, len(samples), 17))
    for i in disturbed:
        samples[i]["seconds"] *= 3
    got, weights, keep = fit_in_situ(samples)
    assert {i for i, k in enumerate(keep) if not k} == disturbed
    assert got.flops_per_s == pytest.approx(params.flops_per_s, rel=1e-5)
    assert got.step_s == pytest.approx(params.step_s, abs=1e-8)
    cells = [shape_cell(StepPlan.from_dict(s["plan"])) for s in samples]
    for cell in {c for c, k in zip(cells, keep) if k}:
        members = [i for i, c in enumerate(cells) if c == cell and keep[i]]
        assert sum(weights[i] * samples[i]["seconds"] ** 2 for i in members) == pytest.approx(1.0)


def test_in_situ_calibration_round_trips_into_a_simulation(tmp_path, monkeypatch):
    """--calibrate (in situ, the default) on the tiny model through the CLI: the engine serves the quick workload
    on the virtual clock, each real step charged a fixed roofline of its tokens and sequences, so the fit's input
    never depends on the machine; the file says it is in situ, and --cost-model reads it into a simulation."""
    import json

    import sim.insitu
    from sim.simulate import main
    execute = ModelRunner.execute

    def charged(self, scheduled):
        out = execute(self, scheduled)
        asyncio.get_running_loop().clock.charge(2e-3 + 5e-5 * sum(n for _, n in scheduled) + 3e-4 * len(scheduled))
        return out

    monkeypatch.setattr(ModelRunner, "execute", charged)
    monkeypatch.setattr(sim.insitu, "run_loop", run_virtual)
    cal = tmp_path / "cal.json"
    assert main(["--calibrate", "--quick-calibration", "--model", "tiny-random", "--dtype", "float32",
                 "--cost-model", str(cal), "--no-progress"]) == 0
    data = json.loads(cal.read_text())
    assert data["method"] == "in-situ" and data["outliers"] == 0 and data["steps"] == len(data["samples"]) > 10
    assert {s["phase"] for s in data["samples"]} == {p.name for p in insitu.QUICK_WORKLOAD}
    assert data["max_abs_error"] < 0.05
    assert main(["--cost-model", str(cal), "--policies", "continuous", "--num-requests", "5", "--prompt-len", "8,32",
                 "--output-len", "2,6", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "calibrated in situ" in report and "step times spread as measured" in report
    assert main(["--cost-model", str(cal), "--policies", "continuous", "--num-requests", "5", "--no-step-spread",
                 "--out", str(tmp_path / "exact"), "--no-progress"]) == 0
    assert "spread" not in (tmp_path / "exact" / "report.md").read_text()
    with pytest.raises(SystemExit):  # --isolated and --in-situ say how to calibrate: nothing without --calibrate
        main(["--isolated", "--cost-model", str(cal)])


def test_a_busy_calibration_is_reported_as_such():
    """Many steps left out, other processes on the CPUs, or a poor fit: each is a reason to calibrate again."""
    from sim.calibrate import busy_reasons
    quiet = dict(outliers=3, samples=[{}] * 300, others_cpu_pct=2.0, median_abs_error=0.08)
    assert busy_reasons(quiet) == []
    assert len(busy_reasons(dict(quiet, outliers=40))) == 1
    assert len(busy_reasons(dict(quiet, others_cpu_pct=35.0))) == 1
    assert len(busy_reasons(dict(quiet, median_abs_error=0.4, others_cpu_pct=None))) == 1


def test_a_phase_other_processes_disturbed_is_served_again(monkeypatch):
    """On the real clock a phase during which other processes used over BUSY_PCT % of the CPUs is served again,
    at most RETRIES times (the quietest attempt's steps are kept); on a virtual clock never."""
    calls = []

    async def serve(runner, phase, seed, clock):
        calls.append(phase.name)
        n = calls.count(phase.name)
        others = {"always busy": 50.0 - n, "busy once": 50.0 if n == 1 else 1.0}.get(phase.name, 1.0)
        return [insitu.StepSample(phase.name, StepPlan((), (9,), 1), 0.0, 0.02, others_cpu=others)], others

    monkeypatch.setattr(insitu, "serve", serve)
    monkeypatch.setattr(insitu, "RETRY_PAUSE_S", 0.0)
    phases = tuple(insitu.Phase(name, ()) for name in ("quiet", "busy once", "always busy"))
    samples = asyncio.run(insitu.collect(None, phases, warm_up=False))
    assert calls == ["quiet", "busy once", "busy once", *["always busy"] * (insitu.RETRIES + 1)]
    assert [(s.phase, s.others_cpu) for s in samples] == [("quiet", 1.0), ("busy once", 1.0),
                                                          ("always busy", 50.0 - insitu.RETRIES - 1)]
    calls.clear()
    run_virtual(insitu.collect(None, phases, warm_up=False))
    assert calls == ["quiet", "busy once", "always busy"]


def test_spread_steps_take_a_measured_ratio_of_steps_like_them_seeded(tiny_runner):
    """SpreadCost: each step's time is the base model's times one of the calibration's measured / modelled ratios
    for its cell (kind, decodes, prompt tokens) when that holds MIN_CELL steps, else its kind's, else any; the
    same sequence for the same seed; flops and bytes untouched. A grid calibration and outliers give no ratios."""
    from sim.cost import spread_cell
    from sim.models import step_ratios

    base = roofline(tiny_runner.model_config, RooflineParams(1e12, 1e11, 1e-3, 1e-5))
    decode, decode8, prompt, mixed = (StepPlan((), (10, 20), 2), StepPlan((), tuple(range(8)), 8),
                                      StepPlan(((16, 16),), (), 1), StepPlan(((16, 16),), (5,), 2))
    sample = lambda plan, r, outlier=False: dict(plan=plan.to_dict(), seconds=r, modelled_seconds=1.0,  # noqa
                                                 outlier=outlier)
    samples = [sample(decode, r) for r in (0.9, 1.0, 1.1, 1.2, 1.5)] + [sample(decode8, 2.0)]
    samples += [sample(prompt, r) for r in (0.8, 1.3)] + [sample(decode, 50.0, outlier=True)]
    ratios = step_ratios(dict(method="in-situ", samples=samples))
    assert ratios == {spread_cell(decode): [0.9, 1.0, 1.1, 1.2, 1.5], spread_cell(decode8): [2.0],
                      spread_cell(prompt): [0.8, 1.3]}
    assert step_ratios(dict(method="isolated", samples=samples)) == {}
    pools = {decode: {0.9, 1.0, 1.1, 1.2, 1.5},  # its own cell: 5 steps
             decode8: {0.9, 1.0, 1.1, 1.2, 1.5, 2.0},  # a cell of 1: the decodes'
             prompt: {0.8, 1.3},  # a cell of 2: the prompts'
             mixed: {0.9, 1.0, 1.1, 1.2, 1.5, 2.0, 0.8, 1.3}}  # no mixed step measured: any
    a, b = SpreadCost(base, ratios, 7), SpreadCost(base, ratios, 7)
    for plan, pool in pools.items():
        seen = set()
        for _ in range(200):
            c, plain = a.cost(plan), base.cost(plan)
            assert c == b.cost(plan) and (c.flops, c.bytes) == (plain.flops, plain.bytes)
            seen.add(round(c.seconds / plain.seconds, 9))
        assert seen == pool, plan
    assert a.peak_flops == base.peak_flops
    with pytest.raises(ValueError):
        SpreadCost(base, {}, 0)
