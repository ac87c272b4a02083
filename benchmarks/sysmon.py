"""CPU utilization over a run, from /proc (Linux): the whole machine's, and one process's (the server's).

Both are percentages of all cores (100 = every core busy for the whole run). On a shared machine the
machine-wide figure includes other people's work; the process figure is the server's alone.
"""
from __future__ import annotations

import os
import threading
import time


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores since boot; None where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _process_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) the process has used, threads included."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces: fields count from after its closing parenthesis.
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMonitor:
    """Context manager: samples the machine's CPU utilization every `interval` seconds in a daemon thread
    (the timeline), and reports the exact means over the whole block from its first and last readings."""

    def __init__(self, pid: int | None = None, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []  # (monotonic seconds, machine %) per interval
        self.cpu_pct: float | None = None             # machine, mean over the block
        self.process_pct: float | None = None         # the process, mean over the block
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="jitney-cpu-monitor")

    def _sample(self) -> None:
        last = _machine_ticks()
        while last and not self._stop.wait(self.interval):
            now = _machine_ticks()
            if now[1] > last[1]:
                self.samples.append((time.monotonic(), 100 * (now[0] - last[0]) / (now[1] - last[1])))
            last = now

    def __enter__(self) -> "CpuMonitor":
        self._t0, self._ticks0 = time.monotonic(), _machine_ticks()
        self._proc0 = _process_seconds(self.pid) if self.pid else None
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        elapsed, ticks = time.monotonic() - self._t0, _machine_ticks()
        if self._ticks0 and ticks and ticks[1] > self._ticks0[1]:
            self.cpu_pct = 100 * (ticks[0] - self._ticks0[0]) / (ticks[1] - self._ticks0[1])
        proc = _process_seconds(self.pid) if self.pid else None
        if self._proc0 is not None and proc is not None and elapsed > 0:
            self.process_pct = 100 * (proc - self._proc0) / (elapsed * (os.cpu_count() or 1))
