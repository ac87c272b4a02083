"""`jitney bench` (or `python -m benchmarks`): one trace replayed open-loop through each batching policy in turn.

Targets: --in-process (the default: an Engine per run over one loaded model), --start-server (a fresh
`jitney serve` per run on a free port, measured over HTTP with streaming), or --url (a server you started:
its one policy; --policies only names it). Traces: synthetic (Poisson or gamma-bursty arrivals; fixed,
uniform, exponential or Azure-sampled lengths), a window of the Azure LLM trace (scaled), or a JSONL file.
--sweep-rates replays it at several offered rates (where is the knee?); --sweep KNOB=a,b,c at several
settings of one batcher knob. Writes report.md (header + tables), results.json (every request record, the
summaries, the timelines) and PNG plots into --out.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from api.cli import parse_bytes
from batcher.config import POLICIES, BatcherConfig
from batcher.engine import Engine
from model_runner.config import RunnerConfig
from model_runner.kv_cache import BlockAllocator
from model_runner.loader import DEFAULT_MODEL, load_tokenizer, resolve_model
from model_runner.runner import ModelRunner

from . import plots
from .azure import azure_lengths, azure_trace
from .http_replay import MetricsSampler, new_client, replay_http
from .machine import cpu_model
from .replay import BATCHER_KNOBS, RequestRecord, batcher_config, prompt_ids, replay
from .report import (Run, cost_per_million, latency_table, step_figures, summarize, throughput_table,
                     wall_seconds)
from .sysmon import CpuMonitor
from .trace import (ARRIVALS, LENGTH_DISTS, TraceRequest, burst, load_trace, lo_hi, offered_rate, rescale_time,
                    save_trace, synthetic)

# Batcher and runner knobs settable (and sweepable) from the command line; None = the server's default.
KNOBS = BATCHER_KNOBS + ("block_size",)
INT_KNOBS = {"max_batch_size", "max_num_batched_tokens", "max_num_seqs", "block_size"}
SYNTHETIC = dict(num_requests=200, rate=8.0, prompt_len=(16, 256), output_len=(16, 256))
# --quick: a smoke comparison of all four policies with the default model, well under a minute of replay.
QUICK = dict(num_requests=24, rate=4.0, prompt_len=(16, 64), output_len=(8, 32))
LEAD_S = 0.1  # the trace's zero is this far ahead of the send loop's start, so no task is created late


class BenchError(Exception):
    """A bench that cannot run (no server, a server that died): a message, not a traceback."""


@dataclass
class RunSpec:
    label: str
    policy: str
    x: float | None
    knobs: dict
    trace: list[TraceRequest] = field(repr=False)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jitney bench", description=__doc__.split("\n\n")[0])
    t = p.add_argument_group("target").add_mutually_exclusive_group()
    t.add_argument("--in-process", action="store_true", help="an Engine per run in this process (the default)")
    t.add_argument("--start-server", action="store_true", help="start `jitney serve` per run, measure over HTTP")
    t.add_argument("--url", help="a running server (e.g. http://127.0.0.1:8000); its tokenizer is --model's")
    m = p.add_argument_group("model and knobs (unset knobs keep the server's defaults)")
    m.add_argument("--model", default=DEFAULT_MODEL, help=f"as for jitney serve (default: {DEFAULT_MODEL})")
    m.add_argument("--dtype", default="auto", help="as for jitney serve (default: auto)")
    m.add_argument("--kv-cache-memory", type=parse_bytes, help="KV-cache bytes, e.g. 512MiB (default: server's)")
    m.add_argument("--policies", help=f"comma-separated, from {','.join(POLICIES)} (default: all; with --url: "
                                      "one name labelling the server's policy)")
    for k in KNOBS:
        m.add_argument(f"--{k.replace('_', '-')}", type=int if k in INT_KNOBS else float,
                       help="as for jitney serve (unset: its default)")
    tr = p.add_argument_group("trace (default: --synthetic poisson)")
    tr.add_argument("--trace", help="replay this JSONL trace")
    tr.add_argument("--azure", action="store_true", help="a window of the Azure LLM conversation trace")
    tr.add_argument("--azure-path", help="the trace CSV (default: ../shared/traces/ beside the repository)")
    tr.add_argument("--azure-start-s", type=float, default=0.0, help="window start, trace seconds (default: 0)")
    tr.add_argument("--azure-duration-s", type=float, help="window length, trace seconds (default: to the end)")
    tr.add_argument("--max-requests", type=int, help="at most this many requests from the window")
    tr.add_argument("--time-scale", type=float, default=1.0,
                    help="Azure: arrival gaps x this, 2 = half the rate (default: 1)")
    tr.add_argument("--token-scale", type=float, default=1.0,
                    help="Azure window and --length-dist azure: lengths / this (default: 1)")
    tr.add_argument("--max-prompt-tokens", type=int, help="clip Azure prompts to fit the model's context")
    tr.add_argument("--synthetic", choices=ARRIVALS, help="arrival process (gamma: bursty, see --gamma-shape)")
    tr.add_argument("--gamma-shape", type=float, default=0.25,
                    help="gamma arrivals: shape k, gaps' CV = 1/sqrt(k); 1 = Poisson, < 1 burstier (default: 0.25)")
    tr.add_argument("--rate", type=float, help=f"synthetic: mean requests/s (default {SYNTHETIC['rate']:g})")
    tr.add_argument("--num-requests", type=int, help=f"synthetic (default {SYNTHETIC['num_requests']})")
    tr.add_argument("--prompt-len", type=lo_hi, help=f"LO,HI prompt tokens; with azure lengths a clip range "
                                                      f"(default: {'%d,%d' % SYNTHETIC['prompt_len']})")
    tr.add_argument("--output-len", type=lo_hi, help=f"LO,HI output tokens, forced with ignore_eos "
                                                      f"(default: {'%d,%d' % SYNTHETIC['output_len']})")
    tr.add_argument("--length-dist", choices=LENGTH_DISTS, default="uniform",
                    help="uniform (default); fixed = the midpoint; exponential = mean at the midpoint, clipped; "
                         "azure = the trace's (prompt, output) pairs / --token-scale")
    tr.add_argument("--seed", type=int, default=0, help="seeds arrivals, lengths and prompts (default: 0)")
    tr.add_argument("--save-trace", help="write the trace replayed (before any rate sweep) to this JSONL file")
    s = p.add_argument_group("sweeps and figures")
    s.add_argument("--sweep-rates", type=floats, help="offered req/s to replay at, e.g. 1,2,4,8")
    s.add_argument("--sweep", type=knob_sweep, help=f"KNOB=v1,v2,... one run per value; KNOB: {', '.join(KNOBS)}")
    s.add_argument("--slo-ttft-ms", type=float, default=1000.0,
                   help="goodput counts requests with a time to first token at most this (default: 1000)")
    s.add_argument("--slo-tpot-ms", type=float, default=100.0,
                   help="... and a time per output token after the first at most this (default: 100)")
    s.add_argument("--hourly-cost", type=float, help="USD per hour of this machine: adds $ per M output tokens")
    s.add_argument("--out", help="output folder (default: results/bench-<timestamp>/)")
    s.add_argument("--quick", action="store_true",
                   help=f"all policies, {QUICK['num_requests']} short Poisson requests, in-process (a smoke run)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if sum(map(bool, (args.trace, args.azure, args.synthetic))) > 1:
        p.error("give one of --trace, --azure, --synthetic")
    if args.sweep and args.sweep_rates:
        p.error("one sweep at a time: --sweep or --sweep-rates")
    if args.url and args.sweep:
        p.error("--sweep restarts the server per value: use --start-server or --in-process, not --url")
    if args.quick and (args.trace or args.azure):
        p.error("--quick makes its own synthetic trace")
    preset = dict(SYNTHETIC, **(QUICK if args.quick else {}))
    if args.length_dist == "azure":  # the trace's own lengths: clipped only where asked
        del preset["prompt_len"], preset["output_len"]
    for k, v in preset.items():  # flags given win over the preset
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.synthetic = args.synthetic or ("poisson" if not (args.trace or args.azure) else None)
    args.policies = args.policies.split(",") if args.policies else ["server"] if args.url else list(POLICIES)
    if args.url:
        if len(args.policies) > 1:
            p.error("a running server has one policy: give --policies with one name (a label)")
    elif unknown := set(args.policies) - set(POLICIES):
        p.error(f"unknown policies {sorted(unknown)}: choose from {', '.join(POLICIES)}")
    args.url = args.url.rstrip("/") if args.url else None
    return args


# --- traces and the runs to make -----------------------------------------------------------------------------

def base_trace(args: argparse.Namespace) -> tuple[list[TraceRequest], str]:
    """The trace and the sentence that describes it (scales included) for every report."""
    retimed = "; arrivals re-timed to each swept rate" if args.sweep_rates else ""
    if args.trace:
        trace = load_trace(args.trace)
        rate = offered_rate(trace)
        arrivals = f"{rate:.2f} req/s offered" if rate else "all at once"
        return trace, f"trace {args.trace}: {len(trace)} requests, {arrivals}{retimed}"
    if args.azure:
        at = azure_trace(args.azure_path, args.azure_start_s, args.azure_duration_s, args.max_requests,
                         args.time_scale, args.token_scale, args.max_prompt_tokens)
        return at.requests, at.describe() + retimed
    return synthetic_at(args, args.rate), synthetic_description(args)


def synthetic_at(args: argparse.Namespace, rate: float) -> list[TraceRequest]:
    azure = args.length_dist == "azure"
    return synthetic(args.num_requests, rate, args.prompt_len, args.output_len, args.synthetic, args.gamma_shape,
                     args.length_dist, args.seed, azure_lengths(args.azure_path, args.token_scale) if azure else None)


def synthetic_description(args: argparse.Namespace) -> str:
    rate = "swept rates" if args.sweep_rates else f"{args.rate:g} req/s"
    arrivals = (f"Poisson at {rate}" if args.synthetic == "poisson" else
                f"gamma (shape {args.gamma_shape:g}) at {rate}")

    def span(r: tuple[int, int] | None) -> str:
        return "any" if r is None else f"{r[0]}..{r[1]}"

    lens = (f"(prompt, output) pairs drawn from the Azure trace / token scale {args.token_scale:g}"
            if args.length_dist == "azure" else f"{args.length_dist} lengths")
    return (f"synthetic: {args.num_requests} requests, {arrivals}, {lens}, prompts {span(args.prompt_len)} tokens, "
            f"outputs {span(args.output_len)} tokens (forced, greedy)")


def at_rate(args: argparse.Namespace, trace: list[TraceRequest], rate: float) -> list[TraceRequest]:
    """The same requests offered at `rate`: synthetic arrivals are redrawn, recorded ones re-timed."""
    if args.synthetic:
        return synthetic_at(args, rate)
    if (base := offered_rate(trace)) is None:
        raise BenchError("the trace arrives all at once: it has no rate to sweep")
    return rescale_time(trace, base / rate)


def plan(args: argparse.Namespace, trace: list[TraceRequest]) -> list[RunSpec]:
    """Every run, the swept value outermost (a block_size change reloads the model once per value)."""
    knobs = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    if args.sweep_rates:
        return [RunSpec(f"{p} @{r:g}/s", p, r, knobs, at_rate(args, trace, r))
                for r in args.sweep_rates for p in args.policies]
    if args.sweep:
        name, values = args.sweep
        cast = int if name in INT_KNOBS else float
        return [RunSpec(f"{p} {name}={cast(v):g}", p, cast(v), {**knobs, name: cast(v)}, trace)
                for v in values for p in args.policies]
    return [RunSpec(p, p, None, knobs, trace) for p in args.policies]


def warm_up_trace(trace: list[TraceRequest]) -> list[TraceRequest]:
    """A few untimed requests first: oneDNN picks its kernels on the first sight of a shape, off the clock."""
    return burst(4, (min(max(r.prompt_tokens for r in trace), 256),) * 2, (8, 8), seed=-1)


# --- in-process target ---------------------------------------------------------------------------------------

class InProcess:
    """One model load per block size; a fresh engine (and KV allocator: no prefix-cache carry-over) per run."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.runner, self.description, self.warm = args, None, "", False

    def get_runner(self, block_size: int | None) -> ModelRunner:
        block_size = block_size or RunnerConfig.block_size
        if self.runner is None or self.runner.block_size != block_size:
            self.runner = ModelRunner(RunnerConfig(model=self.args.model, dtype=self.args.dtype, block_size=block_size,
                                                   kv_cache_memory=self.args.kv_cache_memory), progress=False)
            self.description = self.runner.describe()
            self.warm = False
        return self.runner

    async def run(self, spec: RunSpec, ids: list[list[int]], progress: bool):
        runner = self.get_runner(spec.knobs.get("block_size"))
        if not self.warm:
            warm = warm_up_trace(spec.trace)
            await self._replay(runner, "continuous", {}, warm, prompt_ids(runner.tokenizer, warm, -1), False)
            self.warm = True
        return await self._replay(runner, spec.policy, spec.knobs, spec.trace, ids, progress, spec.label)

    async def _replay(self, runner: ModelRunner, policy: str, knobs: dict, trace: list[TraceRequest],
                      ids: list[list[int]], progress: bool, desc: str = "warm-up"):
        runner.block_allocator = BlockAllocator(runner.num_blocks, runner.block_size)
        engine = Engine(runner, batcher_config(policy, knobs), record_steps=True)
        await engine.start()
        try:
            t0 = time.monotonic() + LEAD_S
            with CpuMonitor(os.getpid()) as cpu:
                records = await replay(engine, trace, runner.tokenizer, progress=progress, desc=desc, ids=ids, t0=t0)
        finally:
            await engine.stop()
        figures, timeline = step_figures(engine.step_log, runner.num_blocks, t0)
        return records, figures, timeline, cpu, t0


# --- HTTP targets --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def jitney_serve(args: argparse.Namespace, spec: RunSpec, log_path: Path) -> AsyncIterator[tuple[str, int]]:
    """A `jitney serve` for this run on a free port: yields (url, pid) once /health answers; SIGTERM after."""
    port = free_port()
    cmd = [sys.executable, "-m", "api.cli", "serve", "--model", args.model, "--dtype", args.dtype,
           "--policy", spec.policy, "--host", "127.0.0.1", "--port", str(port), "--max-queue", str(10**6),
           "--grace-s", "1"]
    for k, v in spec.knobs.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await wait_healthy(url, proc, log_path)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_healthy(url: str, proc: subprocess.Popen | None = None, log_path: Path | None = None,
                       timeout: float = 600.0) -> None:
    """Polls /health (a first start may convert the model for a while); fails early if the server exits."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"jitney serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise BenchError(f"{url}/health did not answer 200 within {timeout:g} s")


async def http_run(url: str, pid: int | None, spec: RunSpec, ids: list[list[int]], tokenizer,
                   progress: bool) -> tuple[list[RequestRecord], dict, dict, CpuMonitor, float]:
    async with new_client() as client:
        warm = warm_up_trace(spec.trace)
        await replay_http(url, warm, prompt_ids(tokenizer, warm, -1), progress=False, client=client)
        t0 = time.monotonic() + LEAD_S
        async with MetricsSampler(client, url, t0) as sampler:
            with CpuMonitor(pid) as cpu:
                records = await replay_http(url, spec.trace, ids, progress, spec.label, t0=t0, client=client)
    figures, timeline = sampler.figures()
    return records, figures, timeline, cpu, t0


# --- one bench -----------------------------------------------------------------------------------------------

def finish_run(spec: RunSpec, args: argparse.Namespace, records: list[RequestRecord], figures: dict,
               timeline: dict, cpu: CpuMonitor, t0: float) -> Run:
    s = summarize(records, wall_seconds(records), None, args.slo_ttft_ms, args.slo_tpot_ms)
    s.update(figures, offered_req_s=offered_rate(spec.trace), knobs=spec.knobs, cpu_pct=cpu.cpu_pct,
             server_cpu_pct=cpu.process_pct, cost_per_mtok=cost_per_million(args.hourly_cost, s["output_tok_s"]))
    timeline = dict(timeline, cpu_t=[t - t0 for t, _ in cpu.samples], cpu_pct=[v for _, v in cpu.samples])
    return Run(spec.label, spec.policy, spec.x, records, s, timeline)


async def run_all(args: argparse.Namespace, specs: list[RunSpec], out: Path) -> tuple[list[Run], str]:
    """Every run in turn; returns them and a description of the model that served them."""
    local = InProcess(args) if not (args.url or args.start_server) else None
    if args.url:
        await wait_healthy(args.url, timeout=10)
    tokenizer = local.get_runner(args.block_size).tokenizer if local else load_tokenizer(resolve_model(args.model))
    model = local.description if local else f"model {args.model}"  # servers say more in their logs
    # The same prompts for every run (fair), except against one long-lived server, whose prefix cache would
    # serve a repeat from memory: there each run gets its own.
    shared = prompt_ids(tokenizer, specs[0].trace, args.seed) if not args.url else None
    runs = []
    for i, spec in enumerate(tqdm(specs, desc="bench", unit="run", disable=args.no_progress)):
        ids = shared or prompt_ids(tokenizer, spec.trace, f"{args.seed}:{i}")
        progress = not args.no_progress
        if local:
            result = await local.run(spec, ids, progress)
            model = local.description
        elif args.url:
            result = await http_run(args.url, None, spec, ids, tokenizer, progress)
        else:
            log_path = out / f"server-{i}-{spec.policy}.log"
            async with jitney_serve(args, spec, log_path) as (url, pid):
                result = await http_run(url, pid, spec, ids, tokenizer, progress)
            model = next((line.removeprefix("jitney: ") for line in log_path.read_text().splitlines()
                          if line.startswith("jitney: ") and "KV cache" in line), model)
        run = finish_run(spec, args, *result)
        failed = [r for r in run.records if not r.ok]
        tqdm.write(f"{run.label}: {run.summary['output_tok_s']:,.0f} output tok/s, "
                   f"{run.summary['completed']}/{run.summary['requests']} done, p99 e2e "
                   f"{(run.summary['e2e_ms']['p99'] or 0) / 1000:.2f} s"
                   + (f"; {len(failed)} failed, e.g. {failed[0].error or 'refused'}" if failed else "")
                   + (f"; the client sent up to {lag:.0f} ms late (it, not the server, was short of CPU)"
                      if (lag := run.summary["submit_lag_ms_max"] or 0) > 50 else ""))
        runs.append(run)
    return runs, model


def header(args: argparse.Namespace, trace_desc: str, model: str, load: float) -> str:
    target = (f"server at {args.url}" if args.url else "`jitney serve` per run, over HTTP (streaming)"
              if args.start_server else "in-process engine (its CPU % is this process: engine and client)")
    defaults = BatcherConfig()
    knobs = ", ".join(f"{k}={getattr(args, k) if getattr(args, k) is not None else getattr(defaults, k):g}"
                      for k in BATCHER_KNOBS)
    swept = args.sweep_rates or (args.sweep[1] if args.sweep else [])
    name = "offered req/s" if args.sweep_rates else args.sweep[0] if args.sweep else ""
    sweep = f"; sweep: {name} = {', '.join(f'{v:g}' for v in swept)}" if swept else ""
    cost = f"; machine cost ${args.hourly_cost:g}/hour" if args.hourly_cost else ""
    # Other processes on a few shared cores slow every figure: the load average says how quiet the machine was.
    return (f"# jitney bench\n\nmachine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average at start {load:.2f}\n"
            f"{model}\ntarget: {target}; open-loop replay\ntrace: {trace_desc}; seed {args.seed}\n"
            f"batcher: {knobs}{sweep}\nSLO for goodput: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= "
            f"{args.slo_tpot_ms:g} ms{cost}")


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
    trace, trace_desc = base_trace(args)
    out = Path(args.out or f"results/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    runs, model = asyncio.run(run_all(args, plan(args, trace), out))
    rows = [(r.label, r.summary) for r in runs]
    report = (f"{header(args, trace_desc, model, load)}\n\n{throughput_table(rows)}\n\n{latency_table(rows)}\n\n"
              f"total {time.time() - started:.0f} s")
    print("\n" + report)
    (out / "report.md").write_text(report + "\n")
    pngs = make_plots(args, runs, out, trace_desc)
    result = dict(argv=sys.argv[1:] if argv is None else argv, header=header(args, trace_desc, model, load),
                  trace=dict(description=trace_desc, requests=[asdict(r) for r in trace]),
                  runs=[dict(label=r.label, policy=r.policy, x=r.x, summary=r.summary, timeline=r.timeline,
                             records=[asdict(rec) for rec in r.records]) for r in runs])
    with open(out / "results.json", "w") as f:
        json.dump(result, f)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}, {', '.join(p.name for p in pngs)}")
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        run_bench(argv)
    except (BenchError, FileNotFoundError, ValueError) as e:  # ValueError: e.g. an empty Azure window
        print(f"jitney bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
