"""The simulator against real runs: calibrate on this host, replay the same traces for real and simulated, and
report the error of every figure the story asks about.

    .venv/bin/python -m benchmarks.sim_validate [--out DIR] [--cost-model FILE] [--plot docs/figures/sim_validation.png]

The calibration is in situ (`jitney simulate --calibrate --in-situ`: every step of the real engine serving a
calibration workload, host work after each step included; sim/insitu.py), the same engine, thread and step
handling the real runs below have; `--calibration isolated` times the old grid of hand-built steps instead.

For each case (Poisson below and above saturation, the burst, an Azure window) the real run goes first
(`jitney bench --in-process`, which saves its trace), then `jitney simulate --cost-model` replays that very
trace, so both see the same arrivals and lengths. The figures compared: output tok/s, TTFT p50/p90/p99, ITL
p50/p99 and e2e p90, per policy. Targets (issue #23): throughput within 5 %, each latency within 10 %.

--repeat-real runs each real case a second time on its saved trace and compares the two real runs the same way:
the run-to-run difference of the engine itself on this machine, which bounds how close any prediction of one
run can come. A simulated figure outside its target but within that difference is counted as "within noise".
Everything goes into --out (default: a new temporary folder); nothing is written into the repository unless
--plot names a path there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from .machine import cpu_model

POLICIES = "sequential,static,dynamic,continuous"
LENGTHS = ["--prompt-len", "16,128", "--output-len", "8,64"]
# (name, workload flags): small enough that the four policies of all four cases run in ~15 min on 2 cores.
CASES = (
    ("poisson 0.4 req/s", ["--workload", "poisson", "--rate", "0.4", "--num-requests", "24", *LENGTHS]),
    ("poisson 4 req/s", ["--workload", "poisson", "--rate", "4", "--num-requests", "48", *LENGTHS]),
    ("burst", ["--workload", "burst", "--num-requests", "48", *LENGTHS]),
    ("azure window", ["--workload", "azure", "--azure-start-s", "1200", "--azure-duration-s", "30",
                      "--max-requests", "40", "--token-scale", "8", "--time-scale", "4"]),
)
# (column, summary key, percentile or None, target relative error)
FIGURES = (("out tok/s", "output_tok_s", None, 0.05),
           ("TTFT p50", "ttft_ms", "p50", 0.10), ("TTFT p90", "ttft_ms", "p90", 0.10),
           ("TTFT p99", "ttft_ms", "p99", 0.10), ("ITL p50", "inter_token_ms", "p50", 0.10),
           ("ITL p99", "inter_token_ms", "p99", 0.10), ("e2e p90", "e2e_ms", "p90", 0.10))


def calibration_summary(path: str) -> str:
    """The calibration's own report (its kind, fitted terms and fit error), as `jitney simulate --calibrate`
    printed it."""
    from sim.calibrate import report
    from sim.models import load_calibration
    return report(load_calibration(path))


def jitney(*args: str, log: IO | None = None, timeout: float | None = None) -> None:
    """One jitney command in a child process (each run starts from a fresh interpreter, as a user's would); its
    output into log (both streams), or its report dropped and its errors shown."""
    subprocess.run([sys.executable, "-m", "jitney.cli", *args, "--no-progress"], check=True, timeout=timeout,
                   stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else None,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})


def summaries(folder: Path) -> dict[str, dict]:
    runs = json.loads((folder / "results.json").read_text())["runs"]
    return {r["policy"]: r["summary"] for r in runs}


def figure(summary: dict, key: str, pct: str | None) -> float:
    v = summary[key]
    return float(v[pct] if pct else v)


def compare(real: dict[str, dict], sim: dict[str, dict]) -> list[dict]:
    rows = []
    for policy in real:
        row = {"policy": policy}
        for col, key, pct, _ in FIGURES:
            r, s = figure(real[policy], key, pct), figure(sim[policy], key, pct)
            row[col] = (r, s, (s - r) / r if r else float("nan"))
        rows.append(row)
    return rows


def within_noise(sim_err: float, noise_err: float, target: float) -> bool:
    """A simulated figure's error is no larger than the real run's own run-to-run difference (or the target)."""
    return abs(sim_err) <= max(target, abs(noise_err))


def tally(results: dict[str, list[dict]], noise: dict[str, list[dict]]) -> str:
    """How many figures meet their target, and (with repeated real runs) how many more are within noise."""
    met = total = quiet = 0
    for case, rows in results.items():
        for i, row in enumerate(rows):
            for col, _, _, target in FIGURES:
                e = row[col][2]
                total += 1
                met += abs(e) <= target
                quiet += case in noise and within_noise(e, noise[case][i][col][2], target)
    line = f"within target: {met} of {total} figures"
    return line + (f"; within target or the real runs' own run-to-run difference: {quiet} of {total}" if noise else "")


def table(case: str, rows: list[dict]) -> str:
    head = "| " + case + " | " + " | ".join(c for c, *_ in FIGURES) + " |\n|---|" + "---:|" * len(FIGURES)
    lines = [head]
    for row in rows:
        cells = []
        for col, _, pct, target in FIGURES:
            r, s, e = row[col]
            mark = "" if abs(e) <= target else " ✗"
            cells.append(f"{r:,.0f} / {s:,.0f} ({100 * e:+.0f} %{mark})")
        lines.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], noise: dict[str, list[dict]], path: str) -> None:
    """One panel per case: each policy's error per figure as bars, and (with --repeat-real) the real runs' own
    run-to-run difference as a black tick on each bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [c for c, *_ in FIGURES]
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (case, rows) in zip(axes, results.items()):
        for i, row in enumerate(rows):
            xs = [j + 0.2 * i for j in range(len(cols))]
            ax.bar(xs, [100 * row[c][2] for c in cols], width=0.2, label=row["policy"])
            if case in noise:
                ax.scatter(xs, [100 * noise[case][i][c][2] for c in cols], marker="_", color="black", s=40,
                           zorder=3, label="real run again" if i == 0 else None)
        ax.axhline(10, color="grey", linewidth=0.8, linestyle="--")
        ax.axhline(-10, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks([j + 0.3 for j in range(len(cols))], cols, rotation=45, ha="right", fontsize=8)
        ax.set_title(case, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("simulated vs real, % error")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"jitney simulate against real runs, {cpu_model()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the calibration, traces and both runs' reports (default: a new "
                                 "temporary folder)")
    p.add_argument("--cost-model", help="reuse this calibration instead of calibrating first")
    p.add_argument("--calibration", choices=("in-situ", "isolated"), default="in-situ",
                   help="how to calibrate when no --cost-model is given (default: in-situ, the engine's own steps; "
                        "isolated: a grid of hand-built steps, each timed alone)")
    p.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                   help="which cases to run, by index: " + "; ".join(f"{i} {c[0]}" for i, c in enumerate(CASES)))
    p.add_argument("--reuse-real", action="store_true",
                   help="--out holds a previous run: keep its real runs and traces, simulate again (after a change "
                        "to the cost model; with --cost-model, or the calibration in --out)")
    p.add_argument("--repeat-real", action="store_true",
                   help="run each real case a second time on its saved trace and report the two real runs' "
                        "difference (the noise floor no prediction can beat) beside the simulator's error")
    p.add_argument("--no-step-spread", action="store_true",
                   help="simulate every step at exactly its modelled time (jitney simulate --no-step-spread)")
    p.add_argument("--plot", help="write the error chart to this PNG")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="jitney-sim-validate-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.reuse_real and not args.out:
        p.error("--reuse-real reads a previous run's --out")
    cal = args.cost_model or str(out / "calibration.json")
    if not args.cost_model and not args.reuse_real:
        print(f"calibrating ({args.calibration}) ...", flush=True)
        jitney("simulate", "--calibrate", f"--{args.calibration}", "--cost-model", cal)
    calibration = calibration_summary(cal)
    print(calibration, flush=True)
    results, noise, parts = {}, {}, []
    for i in (int(c) for c in args.cases.split(",")):
        name, flags = CASES[i]
        real, sim, trace = out / f"real-{i}", out / f"sim-{i}", out / f"trace-{i}.jsonl"
        t = time.perf_counter()
        if not args.reuse_real:
            print(f"{name}: real ...", flush=True)
            jitney("bench", "--in-process", *flags, "--policies", POLICIES, "--save-trace", str(trace),
                   "--out", str(real))
        real_s = time.perf_counter() - t
        print(f"{name}: simulated ...", flush=True)
        t = time.perf_counter()
        jitney("simulate", "--cost-model", cal, "--trace", str(trace), "--policies", POLICIES, "--out", str(sim),
               *(["--no-step-spread"] if args.no_step_spread else []))
        results[name] = compare(summaries(real), summaries(sim))
        real_took = "real reused" if args.reuse_real else f"real {real_s:.0f} s"
        parts.append(table(name, results[name]) + f"\n\n{real_took}, simulated {time.perf_counter() - t:.0f} s")
        if args.repeat_real:
            again = out / f"real-{i}-again"
            if not (args.reuse_real and again.exists()):
                print(f"{name}: real again ...", flush=True)
                jitney("bench", "--in-process", "--trace", str(trace), "--policies", POLICIES, "--out", str(again))
            noise[name] = compare(summaries(real), summaries(again))
            parts.append(table(f"{name}, real run again", noise[name]))
        print(parts[-1], flush=True)
    print(f"\nreal / simulated (error), {cpu_model()}, calibration {cal}; ✗ = outside the target "
          f"(throughput 5 %, latency 10 %)\n{calibration}\n\n" + "\n\n".join(parts)
          + f"\n\n{tally(results, noise)}\ntotal {time.perf_counter() - started:.0f} s")
    if args.plot:
        plot(results, noise, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "calibration": calibration, "cases": results,
                                               "run_to_run": noise}, indent=1))
    return results


if __name__ == "__main__":
    main()
