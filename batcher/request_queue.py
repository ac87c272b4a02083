"""The front door: admission control and the batching window, on the asyncio side.

A request is refused at once (Overloaded, with a retry hint) when too many requests or prompt tokens are
already waiting to start: a bounded queue keeps latency bounded, and a client told "come back in N s" can act,
where one queued without bound just times out. Accepted requests wait in the window until max_batch_size of
them are there or the oldest has waited window_s; then the group is released to the scheduler.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from asyncio_throttle import Throttler

from .clock import REAL_CLOCK, Clock
from .config import BatcherConfig


class Overloaded(Exception):
    """The server is at its queue bound; retry_after is a hint in seconds (for a 429's Retry-After)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Pending:
    item: Any
    num_tokens: int
    arrival: float


class RequestQueue:
    def __init__(self, cfg: BatcherConfig, clock: Clock = REAL_CLOCK):
        self.cfg, self.clock = cfg, clock
        self.pending: deque[Pending] = deque()
        self.num_tokens = 0
        self.throttler = None
        if cfg.max_rps and clock is not REAL_CLOCK:  # asyncio-throttle reads time.monotonic itself
            raise ValueError("max_rps paces on the real clock: it cannot run on a simulated one")
        if cfg.max_rps:  # asyncio-throttle counts whole requests per period
            rate = max(1, round(cfg.max_rps)) if cfg.max_rps >= 1 else 1
            self.throttler = Throttler(rate_limit=rate, period=rate / cfg.max_rps)
        self.num_throttled = 0

    @property
    def num_waiting(self) -> int:
        """Requests accepted here and not released yet (throttled, or in the window)."""
        return len(self.pending) + self.num_throttled

    def check_capacity(self, num_tokens: int, n: int, t: int, seconds_per_request: float) -> None:
        """Raises Overloaded if one more request of num_tokens would pass a bound, n requests of t prompt tokens
        waiting already (the engine counts them: here and released to the scheduler but not running)."""
        if n + 1 > self.cfg.max_queue or t + num_tokens > self.cfg.max_queued_tokens:
            retry = max(1.0, min(60.0, n * seconds_per_request))
            raise Overloaded(f"server overloaded: {n} requests ({t} prompt tokens) are waiting; "
                             f"retry in {retry:.0f}s", retry_after=retry)

    async def throttle(self) -> None:
        """The optional requests/second limit: waits for a slot (counted as waiting meanwhile)."""
        if self.throttler is None:
            return
        self.num_throttled += 1
        try:
            await self.throttler.acquire()
        finally:
            self.num_throttled -= 1

    def put(self, item: Any, num_tokens: int) -> Pending:
        p = Pending(item, num_tokens, self.clock())
        self.pending.append(p)
        self.num_tokens += num_tokens
        return p

    def release(self, now: float) -> list[Any]:
        """Groups whose window has closed (full, or the oldest waited long enough), oldest first."""
        out = []
        while self.pending and (len(self.pending) >= self.cfg.max_batch_size
                                or now - self.pending[0].arrival >= self.cfg.window_s):
            for _ in range(min(self.cfg.max_batch_size, len(self.pending))):
                p = self.pending.popleft()
                self.num_tokens -= p.num_tokens
                out.append(p.item)
        return out

    def remove(self, pred) -> list[Any]:
        """Takes out the items matching pred (those that ended while waiting here)."""
        keep, gone = deque(), []
        for p in self.pending:
            (gone if pred(p) else keep).append(p)
        self.pending = keep
        self.num_tokens = sum(p.num_tokens for p in keep)
        return [p.item for p in gone]

    def next_event(self) -> float | None:
        """When the oldest group's window closes (the engine sleeps until then)."""
        return self.pending[0].arrival + self.cfg.window_s if self.pending else None
