"""One configuration of `jitney plan`: does it fit, how much can one replica serve, and at what rate does it
still meet the SLOs (a bisection over simulations, sim/search.py).

Each probe replays the workload's requests, retimed to the rate under test, through jitney's own engine on the
virtual clock (sim/loop.py, sim/runner.py), and passes when every request completed, the TTFT p90 is within its
SLO and the inter-token latency p99 (every gap of every request, pooled, as Vidur's TBT) within its own. The
same requests and prompts at every rate and for every configuration (one seed), so probes differ only in the
rate and the configuration.

The search's ceiling is the replica's saturated throughput: the same kind of requests all at once, enough of
them to fill the batch four times over, its output tokens timed over the middle half of them (the batch full,
neither filling nor draining). At or above it the queue grows without bound, whatever a short probe shows: a probe of
a few dozen requests ends before a slightly overloaded queue has grown long enough to break a TTFT SLO, so
without the ceiling a short search would overstate the rate a replica sustains.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

from batcher.engine import Engine
from benchmarks.replay import RequestRecord, batcher_config, prompt_ids, replay
from benchmarks.report import percentiles
from benchmarks.trace import TraceRequest
from benchmarks.workloads import WORKLOADS
from model_runner.config import ModelConfig

from .cost import DTYPE_BYTES
from .loop import run_virtual
from .models import sheet_model
from .runner import SimRunner, SimTokenizer
from .search import highest_passing

BLOCK_SIZE = 16  # the server's default


@dataclass(frozen=True)
class Config:
    """One point of the search space: a replica of tp x device, its weights, policy and two knobs."""
    device: str
    tp: int
    weights: str            # as stored: a float dtype (then also the compute dtype) or int8 / int4
    policy: str
    max_num_seqs: int
    max_num_batched_tokens: int

    @property
    def label(self) -> str:
        where = self.device if self.tp == 1 else f"{self.tp}x {self.device}"
        seqs = f" seqs={self.max_num_seqs}" if self.policy == "continuous" else ""  # the others batch max_batch_size
        return f"{where} {self.weights} {self.policy}{seqs} tokens={self.max_num_batched_tokens}"


@dataclass(frozen=True)
class Setup:
    """What every configuration's search shares (picklable: --jobs hands it to worker processes)."""
    model: str
    mc: ModelConfig
    dtype: str                        # compute dtype of int8 / int4 weights
    workload_args: argparse.Namespace  # the workload's flags: retimes the trace to a rate
    trace: list[TraceRequest]
    ids: list[list[int]]
    slo_ttft_p90_ms: float
    slo_itl_p99_ms: float
    tolerance: float
    compute_efficiency: float
    memory_efficiency: float
    step_s: float
    seq_s: float

    def compute_dtype(self, cfg: Config) -> str:
        return cfg.weights if cfg.weights in DTYPE_BYTES else self.dtype


class DoesNotFit(ValueError):
    """The model, or the workload's longest request, does not fit this configuration's memory."""


def sheet_cost(cfg: Config, setup: Setup):
    """(cost model, KV blocks per device) of the configuration from the hardware sheet (sim/models.py)."""
    dtype = setup.compute_dtype(cfg)
    try:
        return sheet_model(setup.mc, setup.model, cfg.device, dtype, cfg.weights, dtype, cfg.tp, BLOCK_SIZE, None,
                           setup.step_s, setup.seq_s, setup.compute_efficiency, setup.memory_efficiency)
    except ValueError as e:
        raise DoesNotFit(str(e)) from None


@dataclass
class Outcome:
    config: Config
    status: str                    # "ok", "does not fit" or "misses the SLOs"
    reason: str = ""               # why not ok
    capacity: float = 0.0          # saturated req/s of one replica (the search's ceiling)
    rate: float = 0.0              # the highest rate that met the SLOs (0 when none did)
    failed_at: float = 0.0         # the lowest that did not (or the ceiling)
    limit: str = ""                # what failed there: TTFT p90, ITL p99, errors, or saturation
    ttft_p90_ms: float | None = None   # at `rate`
    itl_p99_ms: float | None = None
    probes: list[tuple[float, bool]] = field(default_factory=list)
    wall_s: float = 0.0


async def _serve(cfg: Config, cost, blocks: int, setup: Setup, trace: list[TraceRequest],
                 ids: list[list[int]]) -> list[RequestRecord]:
    clock = asyncio.get_running_loop().clock
    runner = SimRunner(setup.mc, cost, clock, blocks, BLOCK_SIZE)
    knobs = dict(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens)
    engine = Engine(runner, batcher_config(cfg.policy, knobs), clock=clock)
    await engine.start()
    try:
        return await replay(engine, trace, runner.tokenizer, progress=False, ids=ids, t0=clock())
    finally:
        await engine.stop()


def token_times(r: RequestRecord) -> list[float]:
    """When each of a request's tokens came, in seconds after the start: the first at its TTFT, then each gap."""
    times = [r.submitted_s + r.ttft_ms / 1e3]
    for gap in r.inter_token_ms:
        times.append(times[-1] + gap / 1e3)
    return times


def saturated_rate(records: list[RequestRecord], trace: list[TraceRequest]) -> float:
    """Output tokens per second over the middle half of a burst's tokens (the batch full: neither filling nor
    draining), in requests of the burst's mean output length. Tokens, not completions: in a burst the short
    requests finish first, and completions counted in a window overstated the rate by 10-19 % (story-6b on
    an a100-80gb; docs/simulation.md#jitney-plan)."""
    times = sorted(t for r in records if r.ok for t in token_times(r))
    if len(times) < 4:
        raise ValueError("a saturation run produced almost no tokens")
    a, b = len(times) // 4, 3 * len(times) // 4
    tokens_per_s = (b - a) / (times[b] - times[a]) if times[b] > times[a] else len(times) / times[-1]
    return tokens_per_s / (sum(r.output_tokens for r in trace) / len(trace))


def concurrency(cfg: Config) -> int:
    """Sequences the policy runs at once, at most (the KV cache may hold fewer)."""
    return {"sequential": 1, "continuous": cfg.max_num_seqs}.get(cfg.policy, batcher_config(cfg.policy, {})
                                                                     .max_batch_size)


def saturation_trace(setup: Setup, cfg: Config) -> tuple[list[TraceRequest], list[list[int]]]:
    """The workload's requests (cycled, with prompts of their own) all at t=0, enough to fill the batch four
    times (the estimate moved 7 % from two fills to four, under 1 % from four to eight)."""
    n = max(len(setup.trace), 4 * concurrency(cfg))
    trace = [TraceRequest(0.0, r.prompt_tokens, r.output_tokens) for r in
             (setup.trace[i % len(setup.trace)] for i in range(n))]
    seed = getattr(setup.workload_args, "seed", 0)
    return trace, prompt_ids(SimTokenizer(setup.mc.vocab_size), trace, f"{seed}:saturation",
                             getattr(setup.workload_args, "shared_prefix", 0))


def measure(records: list[RequestRecord]) -> tuple[float | None, float | None, int]:
    """(TTFT p90, ITL p99, requests that did not complete)."""
    ok = [r for r in records if r.ok]
    ttft = percentiles([r.ttft_ms for r in ok], (90,))["p90"]
    itl = percentiles([g for r in ok for g in r.inter_token_ms], (99,))["p99"]
    return ttft, itl, len(records) - len(ok)


def search_config(cfg: Config, setup: Setup, cost_for=sheet_cost) -> Outcome:
    """The configuration's fit, saturated rate and highest rate within the SLOs. cost_for(cfg, setup) gives
    (cost model, KV blocks) or raises DoesNotFit (tests hand in a fixed cost model)."""
    started = time.perf_counter()
    out = Outcome(cfg, "ok")
    try:
        cost, blocks = cost_for(cfg, setup)
        longest = max(r.prompt_tokens + r.output_tokens for r in setup.trace)
        if blocks * BLOCK_SIZE < longest:
            raise DoesNotFit(f"its KV cache holds {blocks * BLOCK_SIZE:,} tokens, a request needs {longest:,}")
    except DoesNotFit as e:
        out.status, out.reason = "does not fit", str(e)
        return out
    workload = WORKLOADS[setup.workload_args.workload]
    seen: dict[float, tuple] = {}

    def passes(rate: float) -> bool:
        trace = workload.retimed(setup.workload_args, setup.trace, rate)
        ttft, itl, failed = measure(run_virtual(_serve(cfg, cost, blocks, setup, trace, setup.ids)))
        seen[rate] = (ttft, itl, failed)
        return (failed == 0 and ttft is not None and ttft <= setup.slo_ttft_p90_ms
                and (itl is None or itl <= setup.slo_itl_p99_ms))   # None: one-token outputs have no gaps

    burst, ids = saturation_trace(setup, cfg)
    out.capacity = saturated_rate(run_virtual(_serve(cfg, cost, blocks, setup, burst, ids)), burst)
    s = highest_passing(passes, out.capacity, setup.tolerance)
    out.rate, out.failed_at, out.probes = s.lo, s.hi, s.probes
    if s.lo > 0:
        out.ttft_p90_ms, out.itl_p99_ms = seen[s.lo][:2]
    else:
        out.status = "misses the SLOs"
        out.reason = f"even at {s.hi:.3g} req/s, 1/{2 ** len(s.probes)} of its saturated rate"
    out.limit = why_failed(seen.get(s.hi), setup)
    out.wall_s = time.perf_counter() - started
    return out


def why_failed(figures: tuple | None, setup: Setup) -> str:
    if figures is None:
        return "saturation"
    ttft, itl, failed = figures
    reasons = ([f"{failed} errors"] if failed else []) + \
        (["TTFT p90"] if ttft is None or ttft > setup.slo_ttft_p90_ms else []) + \
        (["ITL p99"] if itl is not None and itl > setup.slo_itl_p99_ms else [])
    return " + ".join(reasons)
