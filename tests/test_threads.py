"""--threads: the step thread runs PyTorch, OpenMP (our kernels' pool) and the runner at the count asked, and the
start-up description says it. In a subprocess: the thread count is process-wide, and the rest of the suite runs
with the default."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model_runner import threads

PROBE = r"""
import asyncio, ctypes, json, os, sys
from model_runner.config import RunnerConfig
from model_runner.runner import ModelRunner
from batcher.config import BatcherConfig
from batcher.engine import Engine

n = int(sys.argv[1]) if sys.argv[1] != "none" else None
runner = ModelRunner(RunnerConfig(model="tiny-random", dtype="float32", kv_cache_memory=1 << 20, threads=n),
                     progress=False)
gomp = next(line.split()[-1] for line in open(f"/proc/{os.getpid()}/maps") if "libgomp" in line)
omp = ctypes.CDLL(gomp)

async def main():
    import torch
    engine = Engine(runner, BatcherConfig())
    # The engine's step thread, before any step has run in it: what its OpenMP regions and ATen would use.
    seen = await asyncio.get_running_loop().run_in_executor(
        engine._executor, lambda: (omp.omp_get_max_threads(), torch.get_num_threads()))
    engine._executor.shutdown()
    return seen

omp_n, torch_n = asyncio.run(main())
print(json.dumps({"runner": runner.threads, "omp": omp_n, "torch": torch_n, "describe": runner.describe()}))
"""


@pytest.fixture(scope="module")
def probes() -> dict:
    """PROBE's answer for --threads 1 and for the default, both subprocesses started at once (each spends its
    time importing, one core's worth)."""
    procs = {n: subprocess.Popen([sys.executable, "-c", PROBE, str(n) if n else "none"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in (1, None)}
    answers = {}
    for n, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        answers[n] = json.loads(stdout.strip().splitlines()[-1])
    return answers


def test_one_thread_everywhere_in_the_step_thread(probes):
    r = probes[1]
    assert (r["runner"], r["omp"], r["torch"]) == (1, 1, 1)
    assert "1 thread per step" in r["describe"]


def test_default_is_the_affinity_mask(probes):
    r = probes[None]
    n = threads.available()
    assert (r["runner"], r["omp"], r["torch"]) == (n, n, n)


def test_the_torch_thread_keeps_step_buffers_for_reuse():
    """glibc keeps a step's freed buffers for the next step instead of handing them back to the system: the
    same 32 MB buffer allocated, written and freed five times after a warm-up (the heap grows to a plateau
    first) faults in fewer fresh pages than one allocation has (8,192 each time when it is mmap'd afresh)."""
    import platform
    import resource

    import torch
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")

    def faults_of_repeated_buffers():
        for _ in range(20):
            torch.empty(8 << 20).fill_(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.empty(8 << 20).fill_(1)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert threads.torch_thread().run(faults_of_repeated_buffers) < 8192
