"""What the engine counts: one record per model step, the running counters, and the snapshot /metrics reads."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .request import EndReason


@dataclass
class StepRecord:
    start: float          # seconds on the engine's clock (batcher/clock.py)
    seconds: float
    batch_size: int       # sequences in the step
    num_tokens: int       # tokens fed (prefill chunks + decodes)
    waiting: int          # requests waiting to run after the step was planned
    preempted: int
    kv_blocks_used: int   # blocks some sequence holds


@dataclass
class EngineStats:
    waiting: int
    running: int
    preemptions: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache (whole blocks), as vLLM counts them
    prefix_cache_hits: int     # ... and found there
    steps: int
    mean_batch_size: float
    last_batch_size: int
    last_step_tokens: int
    prompt_tokens: int
    generation_tokens: int
    finished_by_reason: dict[str, int]

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class Counters:
    """Totals since start, and the step log and observers that want each step as it happens."""
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    last_batch_size: int = 0
    last_step_tokens: int = 0
    batch_size_sum: int = 0
    step_seconds: float = 0.0  # EWMA of a step's wall time: the retry hint's unit
    # Ended requests by finish_reason (stop, length, abort), failed ones (timed out, step failed, no valid
    # constrained document) as "error".
    finished_by_reason: Counter = field(default_factory=Counter)
    step_log: list[StepRecord] | None = None  # one StepRecord per step when asked (benchmarks plot them)
    step_observers: list[Callable[[StepRecord], None]] = field(default_factory=list)  # e.g. /metrics' histogram
    # Called with (engine, plan, sampled, t0, seconds) after each step, before its tokens are applied: the step
    # summaries of batcher/step_view.py, present only while a dashboard viewer or a recording watches.
    step_watchers: list[Callable] = field(default_factory=list)

    @property
    def mean_batch_size(self) -> float:
        return self.batch_size_sum / self.steps if self.steps else 0.0

    @property
    def wants_records(self) -> bool:
        return self.step_log is not None or bool(self.step_observers)

    def step(self, seconds: float, batch_size: int, num_tokens: int) -> None:
        self.step_seconds = seconds if not self.steps else 0.9 * self.step_seconds + 0.1 * seconds
        self.steps += 1
        self.last_batch_size, self.last_step_tokens = batch_size, num_tokens
        self.batch_size_sum += batch_size

    def record(self, rec: StepRecord) -> None:
        if self.step_log is not None:
            self.step_log.append(rec)
        for observe in self.step_observers:
            observe(rec)

    def ended(self, reason: EndReason, prompt_tokens: int) -> None:
        """A request ended; its prompt counts as served unless it failed (n > 1 samples pass their prompt once)."""
        failed = reason in (EndReason.TIMED_OUT, EndReason.FAILED)
        # A constrained output with no valid document is an error to the client, though its prompt was served.
        error = failed or reason is EndReason.INVALID_OUTPUT
        self.finished_by_reason["error" if error else reason.finish_reason] += 1
        self.prompt_tokens += 0 if failed else prompt_tokens
