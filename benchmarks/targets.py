"""Where `jitney bench` sends a trace: an Engine in this process, a `jitney serve` it starts per run, or a
server already running. Each run returns the same things: the request records, the engine-side figures
(batch size, KV usage, preemptions), their timeline, the CPU it took, and the trace's zero on the clock."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.stats import StepRecord
from model_runner.config import RunnerConfig
from model_runner.runner import ModelRunner

from .http_replay import MetricsSampler, new_client, replay_http
from .replay import RequestRecord, batcher_config, prompt_ids, replay
from .report import step_figures
from .sysmon import CpuMonitor
from .trace import TraceRequest, burst

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


@dataclass
class RunResult:
    records: list[RequestRecord]
    figures: dict                  # mean_batch, kv_usage_mean/max, preemptions (and steps, in-process)
    timeline: dict[str, list[float]]
    cpu: CpuMonitor
    t0: float                      # monotonic time of the trace's zero


def warm_up_trace(trace: list[TraceRequest]) -> list[TraceRequest]:
    """A few untimed requests first: oneDNN picks its kernels on the first sight of a shape, off the clock."""
    return burst(4, (min(max(r.prompt_tokens for r in trace), 256),) * 2, (8, 8), seed=-1)


# --- in-process ----------------------------------------------------------------------------------------------

async def run_policy(runner: ModelRunner, cfg: BatcherConfig, trace: list[TraceRequest], seed: int = 0,
                     progress: bool = True, desc: str = "replay", ids: list[list[int]] | None = None,
                     t0: float | None = None, recorder=None,
                     label: str = "") -> tuple[list[RequestRecord], list[StepRecord]]:
    """One open-loop replay through a fresh Engine on this runner: the records and the engine's step log.
    recorder: a batcher.step_view.StepRecorder writing this run's step stream as `label` (--record-steps)."""
    # A new engine, a new KV-cache manager: the previous run served the very same prompts, and its prefix cache
    # would have handed this one their KV for free.
    engine = Engine(runner, cfg, record_steps=True)
    await engine.start()
    if recorder is not None:
        recorder.attach(engine, label or cfg.policy, t0)
    try:
        records = await replay(engine, trace, runner.tokenizer, seed, progress, desc, ids=ids, t0=t0)
    finally:
        if recorder is not None:
            recorder.detach()
        await engine.stop()
    return records, engine.step_log


class InProcess:
    """One model load per block size; a fresh engine (and KV allocator) per run."""

    def __init__(self, args: argparse.Namespace, recorder=None):
        self.args, self.runner, self.description, self.warm = args, None, "", False
        self.recorder = recorder  # --record-steps: every measured run's step stream (not the warm-up's)

    def get_runner(self, block_size: int | None) -> ModelRunner:
        block_size = block_size or RunnerConfig.block_size
        if self.runner is None or self.runner.block_size != block_size:
            self.runner = ModelRunner(runner_config(self.args, block_size=block_size), progress=False)
            self.description = self.runner.describe()
            self.warm = False
        return self.runner

    async def run(self, spec: RunSpec, ids: list[list[int]], progress: bool) -> RunResult:
        runner = self.get_runner(spec.knobs.get("block_size"))
        prefix = dict(enable_prefix_caching=not self.args.no_prefix_caching)
        if not self.warm:
            warm = warm_up_trace(spec.trace)
            await run_policy(runner, batcher_config("continuous", {}, **prefix), warm, progress=False,
                             ids=prompt_ids(runner.tokenizer, warm, -1))
            self.warm = True
        t0 = time.monotonic() + LEAD_S
        with CpuMonitor(os.getpid()) as cpu:
            records, steps = await run_policy(runner, batcher_config(spec.policy, spec.knobs, **prefix), spec.trace,
                                              progress=progress, desc=spec.label, ids=ids, t0=t0,
                                              recorder=self.recorder, label=spec.label)
        figures, timeline = step_figures(steps, runner.num_blocks, t0)
        return RunResult(records, figures, timeline, cpu, t0)


def runner_config(args: argparse.Namespace, **overrides) -> RunnerConfig:
    """The model flags of bench.add_model_args as a RunnerConfig (keyword arguments win)."""
    return RunnerConfig(**{**dict(model=args.model, dtype=args.dtype, device=args.device,
                                  quantization=args.quantization, quant_dense_rows=args.quant_dense_rows,
                                  quant_dense_weights=args.quant_dense_weights,
                                  kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=args.kv_cache_memory),
                           **overrides})


# --- over HTTP -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def jitney_serve(args: argparse.Namespace, spec: RunSpec, log_path: Path) -> AsyncIterator[tuple[str, int]]:
    """A `jitney serve` for this run on a free port: yields (url, pid) once /health answers; SIGTERM after."""
    port = free_port()
    cmd = [sys.executable, "-m", "jitney.cli", "serve", "--model", args.model, "--dtype", args.dtype,
           "--device", args.device, "--quantization", args.quantization, "--quant-dense-rows", args.quant_dense_rows,
           "--quant-dense-weights", args.quant_dense_weights,
           "--kv-cache-dtype", args.kv_cache_dtype,
           "--policy", spec.policy, "--host", "127.0.0.1", "--port", str(port), "--max-queue", str(10**6),
           "--grace-s", "1"]
    for k, v in spec.knobs.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
    if args.no_prefix_caching:
        cmd.append("--no-prefix-caching")
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await wait_healthy(url, proc, log_path)
        yield url, proc.pid
    finally:
        stop_server(proc, 30)


def stop_server(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
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
                   progress: bool) -> RunResult:
    async with new_client() as client:
        warm = warm_up_trace(spec.trace)
        await replay_http(url, warm, prompt_ids(tokenizer, warm, -1), progress=False, client=client)
        t0 = time.monotonic() + LEAD_S
        async with MetricsSampler(client, url, t0) as sampler:
            with CpuMonitor(pid) as cpu:
                records = await replay_http(url, spec.trace, ids, progress, spec.label, t0=t0, client=client)
    figures, timeline = sampler.figures()
    return RunResult(records, figures, timeline, cpu, t0)
