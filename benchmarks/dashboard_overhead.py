"""What one dashboard viewer costs the engine (issue #24: at most 2 % of the burst benchmark's output tok/s).

    .venv/bin/python -m benchmarks.dashboard_overhead [--pairs 3] [bench flags...]

Runs `jitney bench --workload burst --policies continuous` in-process (one model load, one warm-up), alternating
runs without a viewer and with one attached (off, on, off, on, ...: drift on a shared machine hits both alike), and
prints output tok/s of each and the median loss. The viewer is what GET /v1/engine/steps puts on the engine: a
StepHub viewer (batcher/step_view.py), so every step's summary is built and JSON-encoded, drained by a task on the
same event loop that frames each batch as SSE and writes it out (to /dev/null: the socket write is uvicorn's,
outside the engine).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

from batcher.step_view import StepHub

from .bench import finish_run, parse_args, plan
from .replay import prompt_ids
from .targets import InProcess
from .workloads import WORKLOADS


class OneViewer:
    """Duck-typed like StepRecorder for InProcess: attached for the measured run, detached after it."""

    def __init__(self):
        self.on, self.events, self._task, self._hub, self._viewer = False, 0, None, None, None
        self.seconds = 0.0  # spent building, encoding and draining summaries in the last run (the viewer's own cost)
        self._out = open(os.devnull, "wb")

    def attach(self, engine, label, origin=None) -> None:
        if not self.on:
            return
        from api.dashboard import frame
        self._hub = StepHub(engine)
        self._viewer = viewer = self._hub.join()
        watchers, inner = engine.counters.step_watchers, self._hub._watch

        def timed(*a):
            t = time.perf_counter()
            inner(*a)
            self.seconds += time.perf_counter() - t

        watchers[watchers.index(inner)] = self._timed = timed
        self._watchers, self._inner = watchers, inner

        async def drain():
            while not viewer.dropped:
                lines = await viewer.take(1.0)
                t = time.perf_counter()
                self.events += len(lines)
                self._out.write(frame(lines))
                self.seconds += time.perf_counter() - t
                await asyncio.sleep(0)  # as a socket send would yield

        self._task = asyncio.get_running_loop().create_task(drain())

    def detach(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._watchers[self._watchers.index(self._timed)] = self._inner
            self._hub.leave(self._viewer)
            assert not self._viewer.dropped, "the viewer fell behind and was dropped"
            self._task = None


async def measure(argv: list[str], pairs: int) -> list[tuple[float, float]]:
    args = parse_args(["--workload", "burst", "--policies", "continuous", "--no-progress", *argv])
    trace, desc = WORKLOADS[args.workload].build(args)
    spec = plan(args, trace)[0]
    viewer = OneViewer()
    local = InProcess(args, viewer)
    ids = prompt_ids(local.get_runner(args.block_size).tokenizer, spec.trace, args.seed, args.shared_prefix)
    print(f"workload: {desc}", flush=True)
    out = []
    for i in range(pairs):
        figures = []
        for on in (False, True):
            viewer.on, viewer.events, viewer.seconds = on, 0, 0.0
            t = time.perf_counter()
            run = finish_run(spec, args, await local.run(spec, ids, False))
            wall = time.perf_counter() - t
            figures.append(run.summary["output_tok_s"])
            print(f"pair {i + 1}: viewer {'on ' if on else 'off'}: {figures[-1]:,.1f} output tok/s"
                  + (f" ({viewer.events} step events; the viewer's own work {viewer.seconds:.2f} s of the run's "
                     f"{wall:.0f} s = {100 * viewer.seconds / wall:.2f} %)" if on else ""), flush=True)
        out.append((figures[0], figures[1]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="off/on pairs to run (default: 3)")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    pairs = asyncio.run(measure(rest, args.pairs))
    losses = [100 * (off - on) / off for off, on in pairs]
    off, on = statistics.median(o for o, _ in pairs), statistics.median(o for _, o in pairs)
    print(f"median output tok/s: {off:,.1f} without a viewer, {on:,.1f} with one; loss per pair "
          f"{', '.join(f'{x:+.1f} %' for x in losses)}; median loss {statistics.median(losses):+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
