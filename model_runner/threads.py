"""How many threads a model step uses (`--threads`): one number for PyTorch's intra-op pool, OpenMP and the native
kernels, which share one libgomp pool (native.py).

The default is every CPU this process may run on (its affinity mask, so `taskset -c 0 jitney serve` uses one),
not os.cpu_count(). Why it matters: a step splits its matmuls and attention over the threads and waits for the
slowest, so a thread whose core is busy with another process stalls the whole step (benchmarks/contention.py
measures it; docs/benchmarks.md#sharing-the-machine gives the advice that follows).

torch.set_num_threads sets ATen's count and the calling thread's OpenMP count only: a thread that has not run
an ATen op yet still starts OpenMP regions (our kernels') at the process default. So every thread that runs
steps calls apply() before its first step (batcher/engine.py's step thread does).
"""
from __future__ import annotations

import os

import torch


def available() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def apply(n: int | None) -> int:
    """Use n threads (None: available()) in this thread's steps; returns the number in force."""
    n = n or available()
    torch.set_num_threads(n)
    return n
