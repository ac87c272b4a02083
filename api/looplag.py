"""The event loop's lag, measured from inside: how late a timer fires is how long the loop could not run.

Every connection is served by one event loop, so anything that keeps it busy (CPU work on it, or another
thread holding the GIL) delays every stream and /health by as much. A task sleeps PERIOD_S at a time and records
how much later than asked it woke: a stall of the loop shows up as one late wake-up of about its length (less
up to PERIOD_S), whatever caused it. It is a histogram on /metrics, jitney_event_loop_lag_seconds, so a stall is
told rather than only felt; tests/test_event_loop.py reads it to show that no request stalls the loop.
"""
from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

PERIOD_S = 0.02  # 50 wake-ups a second: a few tens of microseconds of loop time each
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LoopLag:
    def __init__(self, registry: CollectorRegistry):
        self.histogram = Histogram("jitney_event_loop_lag_seconds", "How late the event loop ran a timer due "
                                   f"every {PERIOD_S:g} s: the time it was kept from serving anyone",
                                   buckets=LAG_BUCKETS, registry=registry)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + PERIOD_S
            await asyncio.sleep(PERIOD_S)
            self.histogram.observe(max(loop.time() - due, 0.0))
