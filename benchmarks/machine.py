"""The machine's ceilings, measured rather than looked up: peak matmul throughput per dtype and memory bandwidth.

A roofline needs both: a kernel with few FLOPs per byte moved (small-batch decode) is capped by bandwidth, one
with many (large batches, prefill) by the matmul peak. `python -m benchmarks.machine` prints them.
"""
from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """Fastest of `reps` timed calls, after one untimed call that pays for page faults and kernel selection.

    The fastest, not the mean: a ceiling is what the hardware can do, and other processes only slow a call down.
    """
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _packed_linear(x: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """oneDNN's prepacked linear x @ w.T, the kernel model_runner.linear uses; None where this torch lacks it."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        fn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
        fn()
        return fn
    except (RuntimeError, AttributeError):
        return None


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best GFLOP/s of an n^3 matmul over torch.mm and the packed linear: the ceiling our kernels can reach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    kernels = [lambda: torch.mm(a, b), _packed_linear(a, b)]
    return max(2 * n**3 / best_seconds(k, reps) for k in kernels if k) / 1e9


def copy_gbps(nbytes: int = 2**30, reps: int = 5) -> float:
    """Memory bandwidth of a large copy, counting the bytes read and the bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_seconds(lambda: dst.copy_(src), reps) / 1e9


def read_gbps(nbytes: int = 2**29, reps: int = 5) -> float:
    """Memory bandwidth of a large sum: bytes read only (what a kernel that reads and barely writes can hope
    for; a copy also writes, and its write-allocate traffic is not counted by copy_gbps)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / best_seconds(lambda: src.sum(), reps) / 1e9


def busy_cpu_seconds() -> float:
    """CPU seconds all processes have kept the machine's CPUs busy since boot (the first line of /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class NeighbourMeter:
    """The share of all CPUs other processes used since start: on a shared machine it tells which timings to doubt
    (with one thread per core, a neighbour makes oneDNN's threads wait for each other and can cost 10x, not 2x)."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_seconds(), time.process_time()

    def share(self) -> float:
        others = busy_cpu_seconds() - self.busy0 - (time.process_time() - self.own0)
        return max(0.0, others / ((time.perf_counter() - self.t0) * os.cpu_count()))


@dataclass
class Machine:
    cpu: str
    threads: int
    torch_version: str
    matmul_gflops: dict[str, float]  # by dtype name
    copy_gbps: float

    @classmethod
    def measure(cls, dtypes: tuple[str, ...] = tuple(DTYPES), quick: bool = False) -> Machine:
        """quick: small probes for smoke runs, whose ceilings come out low (a small matmul misses the peak)."""
        n, nbytes = (512, 2**26) if quick else (2048, 2**30)
        return cls(cpu_model(), torch.get_num_threads(), torch.__version__,
                   {d: matmul_gflops(DTYPES[d], n) for d in dtypes}, copy_gbps(nbytes))

    def roofline_gflops(self, dtype: str, flops_per_byte: float) -> float:
        """The attainable GFLOP/s of a kernel with this arithmetic intensity."""
        return min(self.matmul_gflops[dtype], flops_per_byte * self.copy_gbps)

    def describe(self) -> str:
        peaks = ", ".join(f"{d} {g:,.0f}" for d, g in self.matmul_gflops.items())
        return (f"machine: {self.cpu}, {self.threads} threads, torch {self.torch_version}\n"
                f"ceilings: matmul GFLOP/s {peaks}; copy {self.copy_gbps:.1f} GB/s")


if __name__ == "__main__":
    print(Machine.measure().describe())
