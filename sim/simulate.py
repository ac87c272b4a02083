"""`jitney simulate`: replay a workload through jitney's own scheduler on a simulated device, in virtual time.

Any workload `jitney bench` replays, through any policy and knobs: the real Engine, RequestQueue, Scheduler and
KVCacheManager run on a virtual-time event loop, and a step-cost model stands in for the model (a named device
from the hardware sheet, tensor parallel over --tp of them, or this host as `--calibrate` measured it). The
report is the bench's (throughput, goodput, TTFT / ITL / e2e percentiles, mean batch, KV usage, preemptions,
timeline and CDF plots) plus the device's utilisation and the ratio of simulated to wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from batcher.config import POLICIES
from batcher.engine import Engine
from batcher.step_view import StepRecorder
from benchmarks import bench
from benchmarks.replay import batcher_config, knobs_line, prompt_ids, replay
from benchmarks.report import Run, latency_table, ratio_table, step_figures, throughput_table
from benchmarks.targets import RunResult, RunSpec
from benchmarks.trace import save_trace
from benchmarks.workloads import WORKLOADS, WorkloadError
from model_runner.precision import DTYPES
from model_runner.step_budget import default_max_num_batched_tokens
from model_runner.units import parse_bytes

from .cost import COMPUTE_BYTES, KV_DTYPES, WEIGHT_BYTES, storage_dtype
from .hardware import COMPUTE_EFFICIENCY, DEVICES, MEMORY_EFFICIENCY, STEP_OVERHEAD_S
from .loop import run_virtual
from .models import SHAPES, calibrated_model, load_calibration, model_config, sheet_model
from .runner import GPU_BUDGET, SimRunner

from model_runner.paths import cache_dir

DEFAULT_CALIBRATION = str(cache_dir() / "calibration.json")  # beside the converted models: never in the repo


@dataclass
class _NoCpu:
    """A simulation has no CPU to sample: the bench's CPU columns read '-'."""
    cpu_pct: float | None = None
    process_pct: float | None = None
    samples: list = field(default_factory=list)


def add_efficiency_args(d: argparse._ArgumentGroup) -> None:
    """The hardware sheet's assumed terms (jitney plan takes them too)."""
    d.add_argument("--compute-efficiency", type=float, default=COMPUTE_EFFICIENCY,
                   help=f"fraction of the device's FLOP/s peak a step reaches (default: {COMPUTE_EFFICIENCY}, "
                        "assumed)")
    d.add_argument("--memory-efficiency", type=float, default=MEMORY_EFFICIENCY,
                   help=f"fraction of its memory bandwidth (default: {MEMORY_EFFICIENCY}, assumed)")
    d.add_argument("--step-overhead-ms", type=float, default=STEP_OVERHEAD_S * 1e3,
                   help="a sheet device's fixed cost per step: the host's scheduling, input building, launches and "
                        "sampling while the GPU waits (default: %(default)g, ASSUMED from vLLM's published CPU-overhead "
                        "profile, sim/hardware.py; a calibrated host (--cost-model) has its own fitted value)")
    d.add_argument("--seq-overhead-us", type=float, default=0.0,
                   help="a device step's cost per sequence in it (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    from api.parser import Parser
    p = Parser(prog="jitney simulate", error_prefix="jitney simulate", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="what is modelled, the formula and what is not yet validated: docs/simulation.md")
    d = p.add_argument_group("the simulated device (a hardware sheet, or this host calibrated)")
    d.add_argument("--device", choices=list(DEVICES), default="a100-80gb",
                   help="a device from the hardware sheet, with its datasheet peaks (default: a100-80gb)")
    d.add_argument("--tp", type=int, default=1, help="tensor parallelism: the model split over this many devices, "
                                                     "two all-reduces per layer over their link (default: 1)")
    d.add_argument("--cost-model", metavar="FILE", help="use this host's calibration (written by --calibrate) "
                                                        "instead of --device")
    d.add_argument("--calibrate", action="store_true",
                   help="time real engine steps of --model on this host, fit the cost model, write it to "
                        "--cost-model (default: calibration.json in the cache directory, JITNEY_CACHE_DIR or else "
                        "~/.cache/jitney) and exit; in situ unless --isolated")
    how = d.add_mutually_exclusive_group()
    how.add_argument("--in-situ", action="store_true",
                     help="with --calibrate (the default): the real engine serves a short calibration workload "
                          "(decode batches 1-64, prompt chunks 16-512, mixed steps; ~1 min on 2 cores) and every "
                          "step it runs is timed as the engine lives it, host work after the step included; the fit "
                          "(with attention's FLOPs at a rate of their own) weighs each step's relative error, each "
                          "shape alike, and leaves out disturbed steps")
    how.add_argument("--isolated", action="store_true",
                     help="with --calibrate: time a grid of 12 hand-built steps instead, each alone through the "
                          "model runner (the median of 3 runs), and fit them by plain least squares")
    d.add_argument("--quick-calibration", action="store_true",
                   help="with --calibrate: a few seconds' workload (in situ) or 5 small steps (isolated), for a "
                        "smoke test")
    add_efficiency_args(d)
    m = p.add_argument_group("model and knobs (unset knobs keep the server's defaults)")
    m.add_argument("--model", help=f"{' | '.join(SHAPES)} | a Hugging Face config.json (or its folder) | a model "
                                   "jitney serves (default: story-6b; with --cost-model, the calibrated model; "
                                   "with --calibrate, the server's default)")
    m.add_argument("--dtype", choices=list(COMPUTE_BYTES), default=None,
                   help="compute dtype (default: bfloat16 on a device; the calibration's with --cost-model; "
                        "auto with --calibrate); float32 is priced at the sheet's CUDA-core FP32 peak (PyTorch's "
                        "default), tf32 at its TF32 tensor-core peak (float32 tensors, TF32 matmuls: only when a "
                        "server asks for them)")
    m.add_argument("--weights", choices=list(WEIGHT_BYTES),
                   help="weights as stored (int8, int4: weight-only quantization, matmuls in --dtype; default: "
                        "--dtype)")
    m.add_argument("--kv-cache-dtype", choices=list(KV_DTYPES), help="default: --dtype (int8: jitney's 8-bit cache, "
                   "rows of head_dim bytes and a 4-byte scale)")
    m.add_argument("--quantization", choices=["none", "int8", "q4"], default="none",
                   help="with --calibrate: the runner's --quantization to time (default: none)")
    m.add_argument("--kv-cache-memory", type=parse_bytes,
                   help="KV-cache bytes per device (default: what the memory planner leaves on the device; 2GiB "
                        "on a calibrated host)")
    m.add_argument("--no-prefix-caching", action="store_true", help="as for jitney serve: the prefix cache off")
    m.add_argument("--no-step-spread", action="store_true",
                   help="with --cost-model from an in-situ calibration: every step takes exactly its modelled time "
                        "(default: its modelled time times a ratio drawn, seeded by --seed, from the calibration's "
                        "own measured / modelled ratios for steps like it, so the engine's spread of step times and "
                        "its latency tail carry over; docs/simulation.md)")
    for k in bench.KNOBS:
        m.add_argument(f"--{k.replace('_', '-')}", type=int if k in bench.INT_KNOBS else float,
                       help="as for jitney serve (unset: its default)")
    p.add_argument("--policies", help=f"comma-separated, from {','.join(POLICIES)} (default: all)")
    bench.add_workload_args(p)
    s = p.add_argument_group("sweeps and figures")
    s.add_argument("--sweep-rates", type=bench.floats, help="offered req/s to replay at, e.g. 1,2,4,8")
    s.add_argument("--sweep", type=bench.knob_sweep,
                   help=f"KNOB=v1,v2,... one run per value; KNOB: {', '.join(bench.KNOBS)}")
    s.add_argument("--slo-ttft-ms", type=float, default=1000.0,
                   help="goodput counts requests with a time to first token at most this (default: 1000)")
    s.add_argument("--slo-tpot-ms", type=float, default=100.0,
                   help="... and a time per output token after the first at most this (default: 100)")
    s.add_argument("--hourly-cost", type=float, metavar="USD",
                   help="USD per hour of ONE device (per GPU-hour, as sim/prices.py and jitney plan's --price count); "
                        "the run costs --tp times this: adds $ per M output tokens")
    s.add_argument("--out", help="output folder (default: a new jitney-simulate-<timestamp>-* folder in the "
                                 "system's temporary directory)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--record-steps", metavar="FILE",
                   help="write every run's step stream to this JSONL file, the format `jitney bench --record-steps` "
                        "writes (the dashboard's events: queue, steps, KV blocks, in simulated seconds), to replay "
                        "with `jitney view FILE`")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.tp < 1:
        p.error("--tp must be at least 1")
    if args.dtype == "tf32" and (args.calibrate or args.cost_model):
        p.error("--dtype tf32 is a GPU's matmul mode, priced from the hardware sheet: give --device")
    if (args.in_situ or args.isolated) and not args.calibrate:
        p.error("--in-situ and --isolated say how to --calibrate: give --calibrate too")
    if args.calibrate:
        return args
    if args.cost_model and args.tp != 1:
        p.error("--tp prices all-reduces over a device's link: give --device, not --cost-model")
    bench.resolve(p, args)
    # --hourly-cost is per device (as every price here); the bench's report reads the run's: tp of them.
    args.device_hourly_cost = args.hourly_cost
    if args.hourly_cost:
        args.hourly_cost = args.hourly_cost * args.tp
    return args


# --- one run -------------------------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, block_size: int):
    """(cost model, KV blocks, ModelConfig, model name) for these flags."""
    if args.cost_model:
        cal = load_calibration(args.cost_model)
        name = args.model or cal["model"]
        dtype = args.dtype or cal["dtype"]
        mc = model_config(name)
        weights = args.weights or storage_dtype(dtype)
        cost, blocks = calibrated_model(cal, mc, name, weights, args.kv_cache_dtype or storage_dtype(dtype), block_size,
                                        args.kv_cache_memory, None if args.no_step_spread else args.seed)
    else:
        name, dtype = args.model or "story-6b", args.dtype or "bfloat16"
        mc = model_config(name)
        stored = storage_dtype(dtype)
        cost, blocks = sheet_model(mc, name, args.device, dtype, args.weights or stored, args.kv_cache_dtype or stored,
                                   args.tp, block_size, args.kv_cache_memory, args.step_overhead_ms / 1e3,
                                   args.seq_overhead_us / 1e6, args.compute_efficiency, args.memory_efficiency)
    return cost, blocks, mc, name


def default_budget(args: argparse.Namespace) -> tuple[int, str]:
    """The step budget `jitney serve`'s auto would take on the modelled device: this host's rule for a host
    calibration (in its dtype; quantized where the weights are stored narrower), a GPU's for a sheet."""
    if not args.cost_model:
        return GPU_BUDGET
    dtype = args.dtype or load_calibration(args.cost_model)["dtype"]
    quantized = (args.weights or storage_dtype(dtype)) != storage_dtype(dtype)
    return default_max_num_batched_tokens("cpu", DTYPES.get(storage_dtype(dtype), torch.float32),
                                          "q4" if quantized else "none")


async def simulate_run(spec: RunSpec, args: argparse.Namespace, ids: list[list[int]], progress: bool,
                       budget: tuple[int, str], recorder: StepRecorder | None = None) -> tuple[RunResult, SimRunner]:
    block_size = spec.knobs.get("block_size") or 16
    cost, blocks, mc, _ = build_model(args, block_size)
    clock = asyncio.get_running_loop().clock
    runner = SimRunner(mc, cost, clock, blocks, block_size, description=cost.description, budget=budget)
    cfg = batcher_config(spec.policy, spec.knobs, enable_prefix_caching=not args.no_prefix_caching)
    engine = Engine(runner, cfg, record_steps=True, clock=clock)
    await engine.start()
    t0 = clock()
    if recorder is not None:  # the bench's writer (batcher/step_view.py): `jitney view` reads both alike
        recorder.attach(engine, spec.label, t0)
    try:
        records = await replay(engine, spec.trace, runner.tokenizer, progress=progress, desc=spec.label, ids=ids, t0=t0)
    finally:
        if recorder is not None:
            recorder.detach()
        await engine.stop()
    figures, timeline = step_figures(engine.step_log, runner.num_blocks, t0)
    return RunResult(records, figures, timeline, _NoCpu(), t0), runner


def utilisation(runner: SimRunner, t0: float, span: float, bins: int = 200) -> tuple[dict, dict]:
    """Achieved FLOP/s and bytes/s per device over the run (and over time, in bins), against its peaks."""
    cost = runner.cost_model
    starts = np.array(runner.steps.start) - t0
    secs = np.array([c.seconds for c in runner.steps.cost])
    flops = np.array([c.flops for c in runner.steps.cost])
    nbytes = np.array([c.bytes for c in runner.steps.cost])
    span = span or float((starts + secs).max(initial=0.0)) or 1.0
    summary = dict(achieved_flops=flops.sum() / span, achieved_bytes_per_s=nbytes.sum() / span,
                   flops_util=flops.sum() / span / cost.peak_flops, bandwidth_util=nbytes.sum() / span /
                   cost.peak_bytes_per_s, busy=secs.sum() / span)
    # Cumulative work is piecewise linear (steps never overlap): read it at the bin edges.
    edges = np.linspace(0.0, span, bins + 1)
    pts_t = np.ravel(np.column_stack([starts, starts + secs]))
    out = {}
    for key, work, peak in (("flops_util", flops, cost.peak_flops), ("bandwidth_util", nbytes, cost.peak_bytes_per_s)):
        cum = np.cumsum(work)
        pts_w = np.ravel(np.column_stack([cum - work, cum]))
        at = np.interp(edges, pts_t, pts_w, left=0.0) if len(work) else np.zeros_like(edges)
        out[key] = list(np.diff(at) / np.diff(edges) / peak)
    out["t"] = list(edges[:-1])
    return {k: float(v) for k, v in summary.items()}, out


def utilisation_table(runs: list[Run]) -> str:
    rows = ["| run | achieved TFLOP/s | of peak | achieved GB/s | of peak | device busy | simulated s | wall s | "
            "simulated / wall |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r.summary
        rows.append(f"| {r.label} | {s['achieved_flops'] / 1e12:,.2f} | {s['flops_util']:.1%} | "
                    f"{s['achieved_bytes_per_s'] / 1e9:,.0f} | {s['bandwidth_util']:.1%} | {s['busy']:.0%} | "
                    f"{s['simulated_s']:,.1f} | {s['sim_wall_s']:,.1f} | {s['sim_speed']:,.0f}x |")
    return "\n".join(rows)


def plot_utilisation(runs: list[Run], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for ax, key, name in ((axes[0], "flops_util", "FLOP/s, % of peak"), (axes[1], "bandwidth_util",
                                                                          "memory bytes/s, % of peak")):
        for r in runs:
            u = r.timeline.get("utilisation", {})
            ax.plot(u.get("t", []), [100 * v for v in u.get(key, [])], label=r.label, linewidth=1)
        ax.set_xlabel("simulated time since the replay started (s)")
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title[:150], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def header(args: argparse.Namespace, trace_desc: str, model_desc: str, budget: int) -> str:
    knobs = knobs_line(args, budget)
    prefix = "; prefix caching " + ("off" if args.no_prefix_caching else "on")
    cost = (f"; device cost ${args.device_hourly_cost:g}/hour" + (f" x {args.tp} devices = ${args.hourly_cost:g}/hour"
                                                                   if args.tp > 1 else "")) if args.hourly_cost else ""
    return (f"# jitney simulate\n\nSIMULATED, not measured: jitney's scheduler on a modelled device "
            f"(docs/simulation.md; its error against real runs on a CPU: docs/simulation.md#validation)\n{model_desc}\n"
            f"workload: {trace_desc}; seed {args.seed}\nbatcher: {knobs}{prefix}\nSLO for goodput: TTFT <= "
            f"{args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms{cost}")


def run_simulate(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.calibrate:
        return run_calibrate(args)
    started = time.time()
    trace, trace_desc = WORKLOADS[args.workload].build(args)
    specs = bench.plan(args, trace)
    out = Path(args.out or tempfile.mkdtemp(prefix=f"jitney-simulate-{time.strftime('%Y%m%d-%H%M%S')}-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    cost, _, mc, _ = build_model(args, args.block_size or 16)  # fails here, once, on a plan that cannot fit
    budget = default_budget(args)  # once: a host calibration's file is read here, not again for every run
    from .runner import SimTokenizer
    ids = prompt_ids(SimTokenizer(mc.vocab_size), trace, args.seed, args.shared_prefix)
    runs = []
    recorder = StepRecorder(open(args.record_steps, "w")) if args.record_steps else None
    for spec in specs:
        wall = time.perf_counter()
        result, runner = run_virtual(simulate_run(spec, args, ids if spec.trace is trace else
                                                  prompt_ids(SimTokenizer(mc.vocab_size), spec.trace, args.seed,
                                                             args.shared_prefix), not args.no_progress, budget,
                                                  recorder))
        wall = time.perf_counter() - wall
        run = bench.finish_run(spec, args, result)
        util, series = utilisation(runner, result.t0, run.summary["wall_s"])
        simulated = max((r.finished_s for r in result.records if r.finished_s is not None), default=0.0)
        run.summary.update(util, simulated_s=simulated, sim_wall_s=wall, sim_speed=simulated / wall if wall else 0.0)
        run.timeline["utilisation"] = series
        runs.append(run)
        bench.say(run)
    if recorder is not None:
        recorder.file.close()
        print(f"wrote {args.record_steps}: `jitney view {args.record_steps}` replays it")
    rows = [(r.label, r.summary) for r in runs]
    parts = [throughput_table(rows), latency_table(rows)]
    if not (args.sweep or args.sweep_rates) and (ratios := ratio_table(rows)):
        parts.append(ratios)
    parts.append(utilisation_table(runs))
    head = header(args, trace_desc, cost.description, budget[0])
    report = f"{head}\n\n" + "\n\n".join(parts) + f"\n\ntotal {time.time() - started:.0f} s wall"
    print("\n" + report)
    (out / "report.md").write_text(report + "\n")
    pngs = bench.make_plots(args, runs, out, trace_desc)
    pngs.append(plot_utilisation(runs, out / "utilisation.png", f"simulated device utilisation, {trace_desc}"))
    return bench.write_results(argv, head, trace_desc, trace, runs, out, pngs)


def run_calibrate(args: argparse.Namespace) -> dict:
    from model_runner.loader import DEFAULT_MODEL
    from .calibrate import calibrate, report, save
    path = args.cost_model or DEFAULT_CALIBRATION
    cal = calibrate(args.model or DEFAULT_MODEL, args.dtype or "auto", args.quantization,
                    quick=args.quick_calibration, progress=not args.no_progress, in_situ=not args.isolated)
    save(cal, path)
    print(report(cal) + f"\nwrote {path}; simulate with: jitney simulate --cost-model {path} ...")
    return cal


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_simulate(argv)
    except (WorkloadError, FileNotFoundError, ValueError) as e:
        print(f"jitney simulate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
