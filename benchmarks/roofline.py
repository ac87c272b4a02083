"""Roofline of jitney's decode step, measured: where each batch size lands against the machine's ceilings.

    python -m benchmarks.roofline [--model M] [--dtype bfloat16] [--batch-sizes 1,2,4,...,256] [--context 128]
                                  [--steps 16] [--prefill-len 512] [--out DIR] [--quick]

A decode step reads every weight once for the whole batch, so its FLOPs per byte grow with the batch: at batch 1
it does about one multiply-add per weight read and waits on memory; past the ridge point (peak GFLOP/s divided by
GB/s) the matmul units become the limit. This command measures both ceilings (benchmarks.machine), times a decode
step at each batch size at a fixed context, and places every step on the roofline, with a prefill for contrast.
It prints a table and writes roofline.md, roofline.json and roofline.png under --out.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from model_runner.config import ModelConfig, RunnerConfig
from model_runner.loader import DEFAULT_MODEL, resolve_model
from model_runner.runner import ModelRunner

from .cost import decode_step_cost, matmul_params, prefill_cost, ridge_point
from .machine import DTYPES, Machine, NeighbourMeter
from .steps import (WARMUP_STEPS, kv_cache_memory, make_prompts, mean_decode_context, time_decode_step,
                    time_prefill)

COLUMNS = ["kind", "batch", "tokens/step", "step ms", "tokens/s", "FLOP/byte", "achieved GFLOP/s",
           "attainable GFLOP/s", "% of attainable", "bound", "others' CPU %"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--context", type=int, default=128, help="mean tokens each sequence attends to while timed")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size (their mean is used)")
    p.add_argument("--prefill-len", type=int, default=512, help="tokens of the one-sequence prefill point")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "jitney-roofline"),
                   help="directory for roofline.md, .json and .png (default: jitney-roofline in the system's "
                        "temporary directory; nothing is written into the working directory unless --out names it)")
    p.add_argument("--quick", action="store_true", help="batch sizes 1,8, context 32, 4 steps, prefill 128")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.context, args.steps, args.prefill_len = "1,8", 32, 4, 128
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    return args


# --- points on the roofline ----------------------------------------------------------------------------------

def roofline_point(machine: Machine, dtype: str, kind: str, batch: int, tokens: int, context_len: float,
                   seconds: float, flops: float, nbytes: float) -> dict:
    intensity = flops / nbytes
    achieved, attainable = flops / seconds / 1e9, machine.roofline_gflops(dtype, intensity)
    return dict(kind=kind, batch=batch, tokens_per_step=tokens, context_len=context_len, step_ms=seconds * 1e3,
                tokens_per_s=tokens / seconds, flops_per_step=flops, bytes_per_step=nbytes, intensity=intensity,
                achieved_gflops=achieved, attainable_gflops=attainable, pct_of_attainable=100 * achieved / attainable,
                bound="memory" if intensity < ridge_point(machine, dtype) else "compute")


def decode_point(runner: ModelRunner, machine: Machine, dtype: str, batch: int, prompt_len: int,
                 steps: int) -> dict:
    seconds = time_decode_step(runner, make_prompts(runner.tokenizer, batch, prompt_len), steps)
    context_len = mean_decode_context(prompt_len, steps)
    flops, nbytes = decode_step_cost(runner.model_config, batch, context_len, runner.dtype.itemsize)
    return roofline_point(machine, dtype, "decode", batch, batch, context_len, seconds, flops, nbytes)


def prefill_point(runner: ModelRunner, machine: Machine, dtype: str, n: int, reps: int = 3) -> dict:
    seconds = time_prefill(runner, make_prompts(runner.tokenizer, 1, n)[0], reps)
    flops, nbytes = prefill_cost(runner.model_config, n, runner.dtype.itemsize)
    return roofline_point(machine, dtype, "prefill", 1, n, n, seconds, flops, nbytes)


def watched(point: Callable[[], dict]) -> dict:
    """A point with the share of all CPUs other processes took while it was timed: on a shared machine, what to
    doubt (a busy neighbour can slow a step tenfold, not twofold)."""
    meter = NeighbourMeter()
    row = point()
    return row | dict(others_cpu_pct=100 * meter.share())


# --- report --------------------------------------------------------------------------------------------------

def format_report(report: dict) -> str:
    m, dtype = report["machine"], report["dtype"]
    head = (f"# jitney roofline: {report['model']} {dtype}, decode at context ~{report['context']}\n\n"
            f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch_version']}\n"
            f"ceilings: {dtype} matmul {m['matmul_gflops'][dtype]:,.0f} GFLOP/s, copy {m['copy_gbps']:.1f} GB/s "
            f"-> ridge point {report['ridge_flop_per_byte']:.1f} FLOP/byte\n"
            f"model: {report['matmul_params'] / 1e6:.1f}M matmul parameters; intensity = FLOPs / (weights read "
            f"once per step + each sequence's KV)\nothers' CPU % = share of all CPUs other processes used "
            f"while the row was timed (doubt rows above a few %)")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["rows"]:
        cells = [r["kind"], str(r["batch"]), str(r["tokens_per_step"]), f"{r['step_ms']:.2f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['intensity']:.1f}", f"{r['achieved_gflops']:,.1f}",
                 f"{r['attainable_gflops']:,.1f}", f"{r['pct_of_attainable']:.0f}%", r["bound"],
                 f"{r['others_cpu_pct']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n\n" + "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Log-log roofline: the bandwidth slope, the compute ceiling, the ridge, and one dot per measured step."""
    import matplotlib
    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt
    m, dtype, rows = report["machine"], report["dtype"], report["rows"]
    peak, bw, ridge = m["matmul_gflops"][dtype], m["copy_gbps"], report["ridge_flop_per_byte"]
    xs = [r["intensity"] for r in rows] + [ridge]
    lo, hi = min(xs) / 3, max(xs) * 3
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.loglog([lo, ridge], [lo * bw, peak], color="black", lw=2, label=f"memory roof: {bw:.1f} GB/s × intensity")
    ax.loglog([ridge, hi], [peak, peak], color="dimgray", lw=2,
              label=f"compute roof: {peak:,.0f} GFLOP/s ({dtype} matmul)")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.1f} FLOP/byte", (ridge, peak), xytext=(6, 6), textcoords="offset points",
                fontsize=9, color="gray")
    # The two regimes, written at the foot of the ridge line (x in data units, y in axes units).
    foot = ax.get_xaxis_transform()
    ax.text(ridge, 0.02, "← memory-bound  ", transform=foot, ha="right", fontsize=9, color="gray")
    ax.text(ridge, 0.02, "  compute-bound →", transform=foot, ha="left", fontsize=9, color="gray")
    for kind, color, marker in (("decode", "tab:blue", "o"), ("prefill", "tab:red", "s")):
        pts = [r for r in rows if r["kind"] == kind]
        if not pts:
            continue
        label = ("decode step (label = batch size)" if kind == "decode"
                 else f"prefill, 1 sequence of {pts[0]['tokens_per_step']} tokens")
        ax.scatter([r["intensity"] for r in pts], [r["achieved_gflops"] for r in pts], color=color, marker=marker,
                   zorder=3, label=label)
        for r in pts:
            text = str(r["batch"]) if kind == "decode" else f"prefill {r['tokens_per_step']}"
            ax.annotate(text, (r["intensity"], r["achieved_gflops"]), xytext=(5, -10), textcoords="offset points",
                        fontsize=8, color=color)
    ax.set_ylim(top=peak * 2)  # room for the ridge label above the compute roof
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"jitney roofline: {report['model']} {dtype}, decode steps at context ~{report['context']}\n"
                 f"{m['cpu']}, {m['threads']} threads, torch {m['torch_version']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    # Below the axes, where it can never hide a point.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, fontsize=9, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --- run -----------------------------------------------------------------------------------------------------

def load_runner(args: argparse.Namespace, mc: ModelConfig, prompt_len: int) -> ModelRunner:
    """A runner with just enough KV cache for the largest decode batch or the prefill, whichever needs more."""
    budget = max(kv_cache_memory(mc, args.dtype, max(args.batch_sizes), prompt_len + 1 + WARMUP_STEPS + args.steps),
                 kv_cache_memory(mc, args.dtype, 1, args.prefill_len + 1))
    return ModelRunner(RunnerConfig(model=args.model, dtype=args.dtype, kv_cache_memory=budget), progress=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    mc = ModelConfig.from_hf_dir(resolve_model(args.model))  # converts the model once, before any timing
    # The prompt length that puts the mean context of the timed steps at --context.
    prompt_len = max(1, round(args.context - mean_decode_context(0, args.steps)))
    machine = Machine.measure((args.dtype,), quick=args.quick)
    runner = load_runner(args, mc, prompt_len)
    rows = []
    for batch in args.batch_sizes:
        rows.append(watched(lambda: decode_point(runner, machine, args.dtype, batch, prompt_len, args.steps)))
        print(f"decode batch {batch}: {rows[-1]['step_ms']:.1f} ms/step, others' CPU "
              f"{rows[-1]['others_cpu_pct']:.0f}%", flush=True)
    rows.append(watched(lambda: prefill_point(runner, machine, args.dtype, args.prefill_len)))
    report = dict(model=Path(args.model).name, dtype=args.dtype, context=args.context, prompt_len=prompt_len,
                  steps=args.steps, warmup_steps=WARMUP_STEPS, machine=asdict(machine),
                  matmul_params=matmul_params(mc), ridge_flop_per_byte=ridge_point(machine, args.dtype), rows=rows)
    table = format_report(report)
    print("\n" + table + f"\n\ntotal {time.perf_counter() - t0:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline.md").write_text(table + "\n")
    (out / "roofline.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "roofline.png")
    print(f"wrote {out / 'roofline.md'}, {out / 'roofline.json'}, {out / 'roofline.png'}")
    return report


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
