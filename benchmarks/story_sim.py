"""The story of docs/README.md at its own scale, simulated: story-6b on A100 80 GB cards, every fix it considers.

    python -m benchmarks.story_sim --out DIR [--figures docs/figures]

Every run is a `jitney simulate` (jitney's own scheduler on a virtual clock, the step costs from the A100's
hardware sheet and the efficiencies sim/hardware.py assumes; docs/simulation.md), called in this process; its
command is printed beside its figures, its report and plots are written under --out.

The story's traffic: Poisson arrivals, prompts of 16..256 tokens, short replies of 8..64 tokens (forced),
seed 0. For each configuration (the story's float32 server; A: dynamic batching with a 50 ms window and batches
of 32, 64, 128; B: INT8 weights; C: tensor parallelism over 2, 4, 8 cards; D: an async queue in front of the
same one-at-a-time forward, which is what the sequential policy already is; continuous batching, in float32
and in bfloat16) it finds:
- the capacity: throughput with far more requests offered than it can serve, its utilisation and $/M output
  tokens there;
- p99 end-to-end latency against the offered rate (a sweep at fractions of the capacity), and the rate at
  which p99 reaches the story's 4.2 s (bracketed by the sweep, then refined by regula falsi on log rate and
  log p99), with the utilisation and $/M output tokens there.

Then, on the README's policy-comparison traffic (8..256-token replies, the trace on which this CPU bounds
continuous over static at 1.84x), the continuous-over-static ratio at capacity in both dtypes, beside the bound
the cost model itself puts on it (every prompt prefilled in full chunks and every decode at the largest batch,
as benchmarks.ceiling bounds it on this CPU); and the modelled decode step against the batch (the A100's
roofline for this model). Prints markdown tables; writes nothing outside --out unless --figures names a
folder for the story_*.png plots.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .story_report import print_report, write_figures, write_summary
from .story_runs import OPTIONS, OVERLOAD_RATE, STEP_OVERHEAD_MS, STORY_P99_S, Runner, simulate_story


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.story_sim",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="\n\n".join(__doc__.split("\n\n")[:1] + __doc__.split("\n\n")[2:]))
    p.add_argument("--out", help="folder for every run's report, results and plots (default: a new temporary folder)")
    p.add_argument("--figures", help="also write the story_*.png figures here (e.g. docs/figures)")
    p.add_argument("--requests", type=int, default=400, help="requests per run of the rate sweeps (default: 400)")
    p.add_argument("--capacity-requests", type=int, default=400,
                   help=f"requests per capacity run, offered at {OVERLOAD_RATE:g}/s (default: 400)")
    p.add_argument("--refine", type=int, default=1,
                   help=f"runs at most to refine each rate where p99 reaches {STORY_P99_S} s (default: 1)")
    p.add_argument("--only", help="comma-separated configurations to run, from " + ",".join(o.key for o in OPTIONS)
                                  + " (default: all; with --only, no runs on the README's traffic)")
    p.add_argument("--step-overhead-ms", type=float, default=STEP_OVERHEAD_MS,
                   help="every step's fixed host overhead, in the simulations and the modelled decode steps (default: "
                        "0, the README's figures; jitney simulate's own default for a sheet device is 2)")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="story-sim-"))
    out.mkdir(parents=True, exist_ok=True)
    options = [o for o in OPTIONS if not args.only or o.key in args.only.split(",")]
    started = time.perf_counter()
    run = Runner(out, args.requests, args.capacity_requests, args.step_overhead_ms)
    story = simulate_story(run, options, args.refine, readme=not args.only)
    wall = time.perf_counter() - started
    print_report(story, run, wall)
    write_summary(story, wall, out / "summary.json")
    write_figures(story, Path(args.figures) if args.figures else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
