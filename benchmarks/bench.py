"""`jitney bench` (or `python -m benchmarks`): one workload replayed open-loop through each batching policy in turn.

Targets: --in-process (the default: an Engine per run over one loaded model), --start-server (a fresh
`jitney serve` per run on a free port, measured over HTTP with streaming), or --url (a server you started:
its one policy; --policies only names it). Workloads (--workload, see benchmarks/workloads/): Poisson or
gamma-bursty arrivals at a rate, vLLM's burst (all at once), a window of the Azure LLM trace (scaled), or a
JSONL trace (--trace). --sweep-rates replays it at several offered rates (where is the knee?); --sweep
KNOB=a,b,c at several settings of one batcher knob. Writes report.md (header + tables), results.json (every
request record, the summaries, the timelines) and PNG plots into --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from batcher.config import POLICIES
from batcher.step_view import StepRecorder
from api import flags
from model_runner import quant
from model_runner.loader import DEFAULT_MODEL, model_tokenizer
from model_runner.precision import KV_DTYPES
from model_runner.units import parse_bytes

from . import plots
from .machine import cpu_model
from .replay import BATCHER_KNOBS, knobs_line, prompt_ids
from .report import (Run, cost_per_million, latency_table, ratio_table, summarize, throughput_table,
                     wall_seconds)
from .targets import BenchError, InProcess, RunResult, RunSpec, http_run, jitney_serve, wait_healthy
from .trace import LENGTH_DISTS, lo_hi, offered_rate, save_trace
from .workloads import WORKLOADS, WorkloadError

# Batcher and runner knobs settable (and sweepable) from the command line; None = the server's default.
KNOBS = BATCHER_KNOBS + ("block_size",)
INT_KNOBS = {"max_batch_size", "max_num_batched_tokens", "max_num_seqs", "block_size"}
# --quick: all four policies on 8 short requests, batches of 4 (so static never waits out its flush timeout)
# and a small KV cache: a smoke comparison, seconds with the default model.
QUICK = dict(num_requests=8, rate=50.0, prompt_len=(4, 32), output_len=(4, 16))
QUICK_KNOBS = dict(max_batch_size=4, kv_cache_memory=64 << 20)


# --- arguments -----------------------------------------------------------------------------------------------

def floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated numbers, got {s!r}") from None


def knob_sweep(s: str) -> tuple[str, list[float]]:
    name, _, values = s.partition("=")
    name = name.replace("-", "_")
    if name not in KNOBS or not values:
        raise argparse.ArgumentTypeError(f"want KNOB=v1,v2,... with KNOB one of {', '.join(KNOBS)}; got {s!r}")
    return name, floats(values)


def add_model_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model and knobs (unset knobs keep the server's defaults)")
    m.add_argument("--model", default=DEFAULT_MODEL, help=f"as for jitney serve (default: {DEFAULT_MODEL})")
    m.add_argument("--dtype", default="auto", help="as for jitney serve (default: auto)")
    m.add_argument("--device", default="cpu", help="as for jitney serve: cpu or cuda (default: cpu)")
    m.add_argument("--quantization", default="none", choices=quant.MODES, help="as for jitney serve (default: none)")
    m.add_argument("--quant-dense-rows", default="off", metavar="off|auto|N", type=flags.dense_rows,
                   help="as for jitney serve (default: off)")
    m.add_argument("--quant-dense-weights", default="slices", choices=quant.DENSE_WEIGHTS,
                   help="as for jitney serve (default: slices)")
    m.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *KV_DTYPES],
                   help="as for jitney serve (default: auto)")
    m.add_argument("--kv-cache-memory", type=parse_bytes, help="KV-cache bytes, e.g. 512MiB (default: server's)")
    m.add_argument("--no-prefix-caching", action="store_true", help="as for jitney serve: the prefix cache off")
    for k in KNOBS:
        m.add_argument(f"--{k.replace('_', '-')}", type=int if k in INT_KNOBS else float,
                       help="as for jitney serve (unset: its default)")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=list(WORKLOADS), default="poisson",
                   help="; ".join(f"{n}: {wl.help}" for n, wl in WORKLOADS.items()) + " (default: poisson)")
    w.add_argument("--trace", help="replay this JSONL trace (implies --workload trace)")
    w.add_argument("--num-requests", type=int, help="synthetic workloads: how many (default: the preset's)")
    w.add_argument("--rate", type=float, help="poisson, gamma: mean requests/s (default: the preset's)")
    w.add_argument("--prompt-len", type=lo_hi, help="LO,HI prompt tokens; with azure lengths a clip range")
    w.add_argument("--output-len", type=lo_hi, help="LO,HI output tokens, forced with ignore_eos")
    w.add_argument("--length-dist", choices=LENGTH_DISTS, default="uniform",
                   help="uniform (default); fixed = the midpoint; exponential = mean at the midpoint, clipped; "
                        "azure = the Azure trace's (prompt, output) pairs / --token-scale")
    w.add_argument("--shared-prefix", type=int, default=0,
                   help="synthetic prompts all start with this many common tokens (a system prompt; default: 0)")
    w.add_argument("--seed", type=int, default=0, help="seeds arrivals, lengths and prompts (default: 0)")
    w.add_argument("--save-trace", help="write the trace replayed (before any rate sweep) to this JSONL file")
    w.add_argument("--quick", action="store_true", help=f"{QUICK['num_requests']} short Poisson requests, "
                                                        "batches of 4, a small KV cache, in-process (a smoke run)")
    for wl in WORKLOADS.values():
        if wl.add_args:
            wl.add_args(w)


# `jitney bench WORD ...`: commands with flags of their own, handed everything after the word (main()); the
# help lists them (tests/test_cli.py walks every parser's help for its subcommands).
SUBCOMMANDS = {"routing": ("benchmarks.routing", "replicas and routing policies on a shared-prefix workload, over "
                                                 "HTTP (`jitney bench routing --help`)")}


def build_parser() -> argparse.ArgumentParser:
    from api.parser import Parser  # one-line errors with a "did you mean", as every jitney command
    p = Parser(prog="jitney bench", error_prefix="jitney bench", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="subcommands:\n" + "\n".join(f"  jitney bench {name:<10} {why}"
                                                    for name, (_, why) in SUBCOMMANDS.items()))
    t = p.add_argument_group("target").add_mutually_exclusive_group()
    t.add_argument("--in-process", action="store_true", help="an Engine per run in this process (the default)")
    t.add_argument("--start-server", action="store_true", help="start `jitney serve` per run, measure over HTTP")
    t.add_argument("--url", help="a running server (e.g. http://127.0.0.1:8000); its tokenizer is --model's")
    add_model_args(p)
    p.add_argument("--policies", help=f"comma-separated, from {','.join(POLICIES)} (default: all; with --url: "
                                      "one name labelling the server's policy)")
    add_workload_args(p)
    s = p.add_argument_group("sweeps and figures")
    s.add_argument("--sweep-rates", type=floats, help="offered req/s to replay at, e.g. 1,2,4,8")
    s.add_argument("--sweep", type=knob_sweep, help=f"KNOB=v1,v2,... one run per value; KNOB: {', '.join(KNOBS)}")
    s.add_argument("--slo-ttft-ms", type=float, default=1000.0,
                   help="goodput counts requests with a time to first token at most this (default: 1000)")
    s.add_argument("--slo-tpot-ms", type=float, default=100.0,
                   help="... and a time per output token after the first at most this (default: 100)")
    s.add_argument("--hourly-cost", type=float, help="USD per hour of this machine: adds $ per M output tokens")
    s.add_argument("--out", help="output folder (default: a new jitney-bench-<timestamp>-* folder in the "
                                 "system's temporary directory, named at the end; nothing is written into the "
                                 "working directory unless --out names it)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--record-steps", metavar="FILE",
                   help="write every run's step stream to this JSONL file (the dashboard's events: queue, steps, KV "
                        "blocks; counts and ids, never text), to replay with `jitney view FILE`; in-process only")
    return p


def resolve(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks the flags together and fills those not given from the workload's presets (and --quick's).
    A command with only the model and workload flags (benchmarks.ceiling) has no target, policies or sweeps."""
    url, start_server = getattr(args, "url", None), getattr(args, "start_server", False)
    sweep, sweep_rates = getattr(args, "sweep", None), getattr(args, "sweep_rates", None)
    if args.trace:
        if args.workload not in ("poisson", "trace"):  # poisson: the default, not a choice
            p.error("--trace replays a file: leave out --workload")
        args.workload = "trace"
    elif args.workload == "trace":
        p.error("--workload trace needs --trace FILE")
    server_set = [f for f in ("kv_cache_memory", "no_prefix_caching", *KNOBS) if getattr(args, f)]
    if url and (server_set or sweep):
        p.error(f"a running server keeps its own settings ({', '.join(server_set) or '--sweep'}): use "
                "--start-server or --in-process")
    if sweep and sweep_rates:
        p.error("one sweep at a time: --sweep or --sweep-rates")
    if args.quick:
        if url or start_server or args.workload != "poisson":
            p.error("--quick replays its own Poisson trace in-process")
        for k, v in QUICK_KNOBS.items():
            setattr(args, k, getattr(args, k) or v)
    workload = WORKLOADS[args.workload]
    unread = [k for k in ("num_requests", "rate", "prompt_len", "output_len")
              if getattr(args, k) is not None and k not in workload.presets]
    if args.length_dist != "uniform" and "rate" not in workload.presets:
        unread.append("length_dist")
    if unread:
        p.error(f"the {args.workload} workload does not read --{', --'.join(unread).replace('_', '-')}")
    preset = dict(workload.presets, **(QUICK if args.quick else {}))
    if args.length_dist == "azure":  # the trace's own lengths: clipped only where asked
        preset.pop("prompt_len", None), preset.pop("output_len", None)
    for k, v in preset.items():  # flags given win over the preset
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not hasattr(args, "policies"):
        return args
    args.policies = args.policies.split(",") if args.policies else ["server"] if url else list(POLICIES)
    if url:
        if len(args.policies) > 1:
            p.error("a running server has one policy: give --policies with one name (a label)")
    elif unknown := set(args.policies) - set(POLICIES):
        p.error(f"unknown policies {sorted(unknown)}: choose from {', '.join(POLICIES)}")
    args.url = url.rstrip("/") if url else None
    if getattr(args, "record_steps", None) and (url or start_server):
        p.error("--record-steps records an in-process engine's steps: leave out --url and --start-server")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    return resolve(p, p.parse_args(argv))


# --- the runs to make ----------------------------------------------------------------------------------------

def plan(args: argparse.Namespace, trace) -> list[RunSpec]:
    """Every run, the swept value outermost (a block_size change reloads the model once per value)."""
    knobs = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    if args.sweep_rates:
        workload = WORKLOADS[args.workload]
        return [RunSpec(f"{p} @{r:g}/s", p, r, knobs, workload.retimed(args, trace, r))
                for r in args.sweep_rates for p in args.policies]
    if args.sweep:
        name, values = args.sweep
        cast = int if name in INT_KNOBS else float
        return [RunSpec(f"{p} {name}={cast(v):g}", p, cast(v), {**knobs, name: cast(v)}, trace)
                for v in values for p in args.policies]
    return [RunSpec(p, p, None, knobs, trace) for p in args.policies]


def finish_run(spec: RunSpec, args: argparse.Namespace, result: RunResult) -> Run:
    records, cpu = result.records, result.cpu
    s = summarize(records, wall_seconds(records), None, args.slo_ttft_ms, args.slo_tpot_ms)
    s.update(result.figures, offered_req_s=offered_rate(spec.trace), knobs=spec.knobs, cpu_pct=cpu.cpu_pct,
             server_cpu_pct=cpu.process_pct, cost_per_mtok=cost_per_million(args.hourly_cost, s["output_tok_s"]))
    timeline = dict(result.timeline, cpu_t=[t - result.t0 for t, _ in cpu.samples],
                    cpu_pct=[v for _, v in cpu.samples])
    return Run(spec.label, spec.policy, spec.x, records, s, timeline)


def say(run: Run) -> None:
    failed = [r for r in run.records if not r.ok]
    lag = run.summary["submit_lag_ms_max"] or 0
    tqdm.write(f"{run.label}: {run.summary['output_tok_s']:,.0f} output tok/s, "
               f"{run.summary['completed']}/{run.summary['requests']} done, p99 e2e "
               f"{(run.summary['e2e_ms']['p99'] or 0) / 1000:.2f} s"
               + (f"; {len(failed)} failed, e.g. {failed[0].error or 'refused'}" if failed else "")
               + (f"; the client sent up to {lag:.0f} ms late (it, not the server, was short of CPU)"
                  if lag > 50 else ""))


async def run_all(args: argparse.Namespace, specs: list[RunSpec], out: Path) -> tuple[list[Run], str, int | None]:
    """Every run in turn; returns them, a description of the model that served them, and the step budget an
    unset --max-num-batched-tokens took (auto: the runner's choice; None where no log or runner says)."""
    recorder = StepRecorder(open(args.record_steps, "w")) if args.record_steps else None
    local = InProcess(args, recorder) if not (args.url or args.start_server) else None
    if args.url:
        await wait_healthy(args.url, timeout=10)
    tokenizer = local.get_runner(args.block_size).tokenizer if local else model_tokenizer(args.model)
    model = local.description if local else f"model {args.model}"  # servers say more in their logs
    # The same prompts for every run (fair), except against one long-lived server, whose prefix cache would
    # serve a repeat from memory: there each run gets its own.
    shared = None if args.url else prompt_ids(tokenizer, specs[0].trace, args.seed, args.shared_prefix)
    runs, budget = [], None
    for i, spec in enumerate(tqdm(specs, desc="bench", unit="run", disable=args.no_progress)):
        ids = shared or prompt_ids(tokenizer, spec.trace, f"{args.seed}:{i}", args.shared_prefix)
        progress = not args.no_progress
        if local:
            result = await local.run(spec, ids, progress)
            model, budget = local.description, local.runner.default_max_num_batched_tokens()[0]
        elif args.url:
            result = await http_run(args.url, None, spec, ids, tokenizer, progress)
        else:
            log_path = out / f"server-{i}-{spec.policy}.log"
            async with jitney_serve(args, spec, log_path) as (url, pid):
                result = await http_run(url, pid, spec, ids, tokenizer, progress)
            log = log_path.read_text()
            model = next((line.removeprefix("jitney: ") for line in log.splitlines()
                          if line.startswith("jitney: ") and "KV cache" in line), model)
            said = re.search(r"max_num_batched_tokens (\d+)", log)  # the server's start-up line
            budget = int(said.group(1)) if said else budget
        runs.append(finish_run(spec, args, result))
        say(runs[-1])
    if recorder is not None:
        recorder.file.close()
        tqdm.write(f"wrote {args.record_steps}: `jitney view {args.record_steps}` replays it")
    return runs, model, budget


# --- report --------------------------------------------------------------------------------------------------

def header(args: argparse.Namespace, trace_desc: str, model: str, load: float, budget: int | None = None) -> str:
    target = (f"server at {args.url}" if args.url else "`jitney serve` per run, over HTTP (streaming)"
              if args.start_server else "in-process engine (its CPU % is this process: engine and client)")
    knobs = knobs_line(args, budget)
    prefix = "" if args.url else "; prefix caching " + ("off" if args.no_prefix_caching else "on")
    shared = f", the first {args.shared_prefix} prompt tokens shared" if args.shared_prefix else ""
    swept = args.sweep_rates or (args.sweep[1] if args.sweep else [])
    name = "offered req/s" if args.sweep_rates else args.sweep[0] if args.sweep else ""
    sweep = f"; sweep: {name} = {', '.join(f'{v:g}' for v in swept)}" if swept else ""
    cost = f"; machine cost ${args.hourly_cost:g}/hour" if args.hourly_cost else ""
    # Other processes on a few shared cores slow every figure: the load average says how quiet the machine was.
    return (f"# jitney bench\n\nmachine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average at start {load:.2f}\n"
            f"{model}\ntarget: {target}; open-loop replay\nworkload: {trace_desc}{shared}; seed {args.seed}\n"
            f"batcher: {knobs}{prefix}{sweep}\nSLO for goodput: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= "
            f"{args.slo_tpot_ms:g} ms{cost}")


def tables(args: argparse.Namespace, runs: list[Run]) -> str:
    rows = [(r.label, r.summary) for r in runs]
    parts = [throughput_table(rows), latency_table(rows)]
    if not (args.sweep or args.sweep_rates) and (ratios := ratio_table(rows)):
        parts.append(ratios)
    reference = WORKLOADS[args.workload].reference
    if reference and (line := reference(args)):
        parts.append(line)
    return "\n\n".join(parts)


def make_plots(args: argparse.Namespace, runs: list[Run], out: Path, trace_desc: str) -> list[Path]:
    sweep_name = "rate" if args.sweep_rates else args.sweep[0] if args.sweep else None
    title = f"jitney, {trace_desc}"
    if len(title) > 150:
        title = title[:147] + "..."
    paths = [plots.latency_cdfs(runs, out / "latency_cdf.png", title, sweep_name),
             plots.timelines(runs, out / "timeline.png", title, sweep_name)]
    if sweep_name:
        xs = [r.x for r in runs]
        x_label = "offered load (requests/s)" if args.sweep_rates else args.sweep[0]
        positive = [x for x in xs if x > 0] or [1]
        paths.append(plots.sweep(runs, out / "sweep.png", title, x_label, log_x=max(xs) >= 8 * min(positive)))
    return paths


def run_bench(argv: list[str] | None = None) -> dict:
    """Runs the bench; returns what results.json holds."""
    args = parse_args(argv)
    started, load = time.time(), os.getloadavg()[0]
    trace, trace_desc = WORKLOADS[args.workload].build(args)
    out = Path(args.out or tempfile.mkdtemp(prefix=f"jitney-bench-{time.strftime('%Y%m%d-%H%M%S')}-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    runs, model, budget = asyncio.run(run_all(args, plan(args, trace), out))
    head = header(args, trace_desc, model, load, budget)
    report = f"{head}\n\n{tables(args, runs)}\n\ntotal {time.time() - started:.0f} s"
    print("\n" + report)
    (out / "report.md").write_text(report + "\n")
    pngs = make_plots(args, runs, out, trace_desc)
    return write_results(argv, head, trace_desc, trace, runs, out, pngs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    try:
        run_bench(argv)
    except (BenchError, WorkloadError, FileNotFoundError, ValueError) as e:  # ValueError: an empty Azure window
        print(f"jitney bench: error: {e}", file=sys.stderr)
        return 2
    return 0



def write_results(argv, head: str, trace_desc: str, trace, runs, out, pngs) -> dict:
    """results.json (the trace, every run's summary, timeline and records) beside report.md and the plots."""
    result = dict(argv=sys.argv[1:] if argv is None else argv, header=head,
                  trace=dict(description=trace_desc, requests=[asdict(r) for r in trace]),
                  runs=[dict(label=r.label, policy=r.policy, x=r.x, summary=r.summary, timeline=r.timeline,
                             records=[asdict(rec) for rec in r.records]) for r in runs])
    with open(out / "results.json", "w") as f:
        json.dump(result, f)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}, {', '.join(p.name for p in pngs)}")
    return result


if __name__ == "__main__":
    sys.exit(main())
