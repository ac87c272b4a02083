"""How many threads a model step uses (`--threads`): one number for PyTorch's intra-op pool, OpenMP and the native
kernels, which share one libgomp pool (native.py).

The default is every CPU this process may run on (its affinity mask, so `taskset -c 0 jitney serve` uses one),
not os.cpu_count(). Why it matters: a step splits its matmuls and attention over the threads and waits for the
slowest, so a thread whose core is busy with another process stalls the whole step (benchmarks/contention.py
measures it; docs/benchmarks.md#sharing-the-machine gives the advice that follows).

torch.set_num_threads sets ATen's count and the calling thread's OpenMP count only: a thread that has not run
an ATen op yet still starts OpenMP regions (our kernels') at the process default. So the thread that runs steps
calls apply() before its first step.

All of a process's model work runs on one thread, the torch thread below: loading, every step, scoring. libgomp
gives each thread that starts OpenMP regions a pool of its own, and once the process holds more OpenMP threads
than CPUs (the loading thread's pool and the step thread's, 4 threads on 2 CPUs) it throttles their spinning, so
every parallel region of a step pays a sleep and a wake-up. Loading on the main thread and stepping on the
engine's thread cost a batch-1 decode step 1.6-1.8x (SmolLM2, bfloat16, AMD Zen 4, 2 cores: 44-52 ms against
23-27 ms with one thread doing both; benchmarks/one_thread.py, docs/benchmarks.md#one-thread-for-the-model).

A step allocates the same large buffers every time (at decode batch 128 the logits alone are 25 MB), and glibc
serves such buffers with mmap and returns them with munmap, or trims them off the heap, so every step paid
thousands of page faults on fresh zeroed pages. keep_step_buffers() tells glibc to keep freed memory up to a
bound for reuse: a batch-128 decode step of SmolLM2 (bfloat16, AMD Zen 4, 2 cores) went from 298 to 226 ms and
a 512-token prefill from 527 to 475 ms (`python -m benchmarks.profile_step`; docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes
import os
import platform
import queue
import threading
from concurrent.futures import Executor, Future

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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 256 << 20  # larger buffers (loading a checkpoint) still go back to the system when freed
TRIM_THRESHOLD = 512 << 20  # free memory kept at the top of the heap before it is returned


def keep_step_buffers() -> bool:
    """Lets glibc keep a step's freed buffers for the next step (see above); False where libc is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # One arena, the main heap: a thread's own arena lives in 64 MB heaps that glibc unmaps whenever one
        # empties, whatever the thresholds say, and a step's buffers come and go by tens of megabytes.
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                    and libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


class TorchThread(Executor):
    """The one thread that runs the model (see above). A daemon thread: Ctrl-C during a load ends the process
    instead of waiting for the load; an Executor, so the engine hands it steps with run_in_executor."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        keep_step_buffers()
        self._thread = threading.Thread(target=self._work, name="jitney-torch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # the caller's to handle, as with any executor
                    future.set_exception(e)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def run(self, fn, *args, **kwargs):
        """fn(*args) on this thread (at once when called from it), its result or its exception here."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shared by every engine and runner of the process: it lives as long as the process."""


_torch_thread: TorchThread | None = None
_lock = threading.Lock()


def torch_thread() -> TorchThread:
    """The process's torch thread, started on first use."""
    global _torch_thread
    with _lock:
        if _torch_thread is None:
            _torch_thread = TorchThread()
        return _torch_thread
