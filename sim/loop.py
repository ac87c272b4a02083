"""A virtual-time asyncio event loop: when every task waits, time jumps to the next timer.

This is a discrete-event simulator built from asyncio itself. The loop's time() is a VirtualClock; where a real
loop would block in select() until its next timer, this one moves the clock to that timer and goes on. The
engine's own coroutines (the batching window's timers, the queue, the replay's arrivals) therefore run unchanged
on simulated time, in the order their times give, and an hour of traffic costs only the Python it executes.

A model step is the one thing that takes time without a timer: the engine hands it to run_in_executor. Here it
runs inline, charges the clock what it modelled (VirtualClock.charge, called by the runner), and its result
arrives that much later; arrivals and window timers inside the step fire at their own times meanwhile, as they
would while a real step runs on the engine thread.
"""
from __future__ import annotations

import asyncio
import selectors


class SimulationStalled(RuntimeError):
    """Every task waits on something no timer will ever bring: a real server would hang here too."""


class VirtualClock:
    """Seconds since the simulation began; a Clock (batcher/clock.py) the engine and the loop both read."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self._charged = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def charge(self, seconds: float) -> None:
        """The work running inline now takes this long (a modelled model step)."""
        if not seconds >= 0:
            raise ValueError(f"a step cannot take {seconds!r} s")
        self._charged += seconds

    def take_charge(self) -> float:
        charged, self._charged = self._charged, 0.0
        return charged


class _JumpingSelector(selectors.DefaultSelector):
    """select(timeout) advances the clock by the timeout instead of sleeping (asyncio asks for exactly the time
    to its next timer), then polls the real file descriptors without waiting (only the loop's own wake-up pipe
    is registered in a simulation)."""

    def __init__(self, clock: VirtualClock):
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None):
        if timeout is None:
            raise SimulationStalled("the simulation stalled: every task waits and no timer is set")
        if timeout > 0:
            self.clock.advance(timeout)
        return super().select(0)


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock | None = None):
        self.clock = clock or VirtualClock()
        super().__init__(_JumpingSelector(self.clock))

    def time(self) -> float:
        return self.clock.now

    def run_in_executor(self, executor, func, *args) -> asyncio.Future:
        """Runs func now, on the loop's thread; its result (or exception) arrives after the time it charged."""
        fut = self.create_future()
        self.clock.take_charge()  # nothing charged outside a step counts
        try:
            result, error = func(*args), None
        except Exception as e:  # the engine's step handler sees it, as from a real executor
            result, error = None, e
        self.call_at(self.time() + self.clock.take_charge(), _settle, fut, result, error)
        return fut


def _settle(fut: asyncio.Future, result, error: Exception | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def run_virtual(coro, clock: VirtualClock | None = None):
    """Runs coro to completion on a fresh VirtualLoop (time starts at 0 unless a clock is given)."""
    with asyncio.Runner(loop_factory=lambda: VirtualLoop(clock)) as runner:
        return runner.run(coro)
