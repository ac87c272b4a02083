"""The story's report (benchmarks/story_sim.py): its markdown tables, the story_*.png figures, summary.json.

Everything here reads the runs benchmarks/story_runs.py made; nothing here simulates.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .machine import cpu_model
from .story_runs import (DECODE_CONTEXT, DEVICE, OVERLOAD_RATE, PRICE_PER_GPU_HOUR, PRICE_SOURCE, README_TRAFFIC,
                         RATIO_RUNS, STORY_P99_S, STORY_RATE, STORY_TRAFFIC, Option, Point, Result, Runner, Story)


# --- tables ---------------------------------------------------------------------------------------------------

def pct(x: float) -> str:
    return f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def usd(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def command(argv: list[str]) -> str:
    """The argv as a command line, --out and --no-progress left out (they change nothing simulated)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a != "--no-progress":
            out.append(a)
    return ".venv/bin/jitney simulate " + " ".join(out)


def capacity_table(results: list[Result]) -> str:
    rows = ["| configuration | A100s | capacity req/s | output tok/s | mean batch | device busy | FLOP/s of peak | "
            "bytes/s of peak | $/M output tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r.capacity.s
        rows.append(f"| {r.option.label} | {r.option.gpus} | {s['req_s']:,.2f} | {s['output_tok_s']:,.0f} | "
                    f"{s['mean_batch']:.1f} | {pct(s['busy'])} | {pct(s['flops_util'])} | {pct(s['bandwidth_util'])} | "
                    f"{usd(s['cost_per_mtok'])} |")
    return "\n".join(rows)


def story_p99_table(results: list[Result]) -> str:
    rows = [f"| configuration | A100s | req/s at p99 = {STORY_P99_S} s | p99 e2e | TTFT p99 | ITL p99 | output tok/s | "
            f"device busy | FLOP/s of peak | bytes/s of peak | $/M output tokens | A100s for {STORY_RATE:,.0f} req/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r.at_story_p99
        if p is None:
            rows.append(f"| {r.option.label} | {r.option.gpus} | none: {r.note} | | | | | | | | | |")
            continue
        s = p.s
        fleet = math.ceil(STORY_RATE / p.rate) * r.option.gpus
        rows.append(f"| {r.option.label} | {r.option.gpus} | {p.rate:,.3g}{' (capacity)' if r.note else ''} | "
                    f"{p.p99_s:.2f} s | {s['ttft_ms']['p99'] / 1e3:.2f} s | {s['inter_token_ms']['p99']:,.0f} ms | "
                    f"{s['output_tok_s']:,.0f} | {pct(s['busy'])} | {pct(s['flops_util'])} | "
                    f"{pct(s['bandwidth_util'])} | {usd(s['cost_per_mtok'])} | {fleet:,} |")
    return "\n".join(rows)


def ratio_table(caps: dict[str, Point], ceilings: dict[str, float]) -> str:
    rows = ["| dtype | static, batch <= 32: tok/s | static, batch <= 128: tok/s | continuous: tok/s | "
            "continuous / static 32 | continuous / static 128 | ceiling tok/s | ceiling / static 32 | "
            "ceiling / static 128 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype, suffix in (("float32", "f32"), ("bfloat16", "bf16")):
        s32, s128, c = (caps[f"readme-{k}-{suffix}"].s["output_tok_s"] for k in ("static", "static128", "continuous"))
        rows.append(f"| {dtype} | {s32:,.0f} | {s128:,.0f} | {c:,.0f} | {c / s32:.2f}x | {c / s128:.2f}x | "
                    f"{ceilings[dtype]:,.0f} | {ceilings[dtype] / s32:.2f}x | {ceilings[dtype] / s128:.2f}x |")
    return "\n".join(rows)


def curve_table(rows: list[dict]) -> str:
    out = ["| weights, compute | batch | step ms | tokens/s | FLOP/byte | FLOP/s of peak | bytes/s of peak | bound |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['batch']} | {r['step_ms']:.2f} | {r['tok_s']:,.0f} | {r['intensity']:.1f} | "
                   f"{pct(r['flops_util'])} | {pct(r['bw_util'])} | {r['bound']} |")
    return "\n".join(out)


# --- figures --------------------------------------------------------------------------------------------------

def label(option: Option) -> str:
    return option.label + (f" ({option.gpus} A100s)" if option.gpus > 1 else "")


def plot_p99(results: list[Result], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(13, 6))
    for r in results:
        pts = sorted(r.sweep, key=lambda p: p.rate)
        style = "-" if r.option.story else "--"
        line, = ax.plot([p.rate for p in pts], [p.p99_s for p in pts], style, marker="o", markersize=3,
                        linewidth=1.2, label=label(r.option))
        if r.at_story_p99 and not r.note:
            ax.plot([r.at_story_p99.rate], [r.at_story_p99.p99_s], "*", color=line.get_color(), markersize=11)
    ax.axhline(STORY_P99_S, color="black", linestyle=":", linewidth=1)
    ax.text(STORY_RATE * 0.9, STORY_P99_S * 1.08, f"the story's p99, {STORY_P99_S} s", fontsize=8, ha="right")
    ax.axvline(STORY_RATE, color="red", linestyle=":", linewidth=1)
    ax.text(STORY_RATE * 0.9, STORY_P99_S * 6, f"the story's\n{STORY_RATE:,.0f} req/s", fontsize=8, color="red",
            ha="right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, Poisson; prompts 16..256 tokens, replies 8..64)")
    ax.set_ylabel("p99 end-to-end latency (s)")
    ax.set_title("SIMULATED: story-6b on A100 80 GB (jitney simulate, assumed efficiencies); * = p99 of 4.2 s",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(results: list[Result], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    labels = [label(r.option) for r in results]
    cap = [r.capacity.s["cost_per_mtok"] for r in results]
    slo = [r.at_story_p99.s["cost_per_mtok"] if r.at_story_p99 else np.nan for r in results]
    y = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.barh(y - 0.2, cap, 0.4, label="at capacity (the device never idle)")
    ax.barh(y + 0.2, slo, 0.4, label=f"at the rate where p99 reaches {STORY_P99_S} s (at capacity where it never does)")
    for yi, v in zip(y, cap):
        ax.text(v * 1.04, yi - 0.2, f"\\${v:,.2f}", va="center", fontsize=7)
    for yi, v in zip(y, slo):
        if np.isnan(v):
            ax.text(0.01, yi + 0.2, "no such rate", va="center", fontsize=7, transform=ax.get_yaxis_transform())
        else:
            ax.text(v * 1.04, yi + 0.2, f"\\${v:,.2f}", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=np.nanmax(cap + slo) * 2.5)
    ax.set_xlabel(f"\\$ per million output tokens (A100 80 GB at \\${PRICE_PER_GPU_HOUR}/hour, assumed)")
    ax.set_title("SIMULATED: the cost of a million output tokens, story-6b, per configuration", fontsize=10)
    ax.grid(alpha=0.3, axis="x", which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for config in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == config]
        axes[0].plot([r["batch"] for r in rs], [r["tok_s"] for r in rs], marker="o", label=config)
        axes[1].plot([r["batch"] for r in rs], [100 * r["flops_util"] for r in rs], marker="o", label=config)
    axes[0].set_ylabel("decode tokens/s")
    axes[1].set_ylabel("FLOP/s, % of the dtype's peak")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"decode batch (contexts of {DECODE_CONTEXT} tokens)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.suptitle("MODELLED: story-6b decode steps on one A100 80 GB (jitney simulate's cost model, assumed "
                 "efficiencies 60 % / 80 %)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the report -----------------------------------------------------------------------------------------------

def print_report(story: Story, run: Runner, wall: float) -> None:
    """The markdown report on stdout: the tables, every sweep's points, the commands, what it all took."""
    results, caps, idle = story.results, story.caps, story.idle
    print("# The story, simulated (python -m benchmarks.story_sim)\n")
    print(f"SIMULATED, not measured: jitney simulate on {DEVICE} (hardware sheet, assumed efficiencies, "
          f"{run.step_overhead_ms:g} ms per step of host overhead; docs/simulation.md). The story's traffic: "
          + " ".join(STORY_TRAFFIC) + f"; sweeps of {run.requests} requests, capacity runs of "
          f"{run.capacity_requests} offered at {OVERLOAD_RATE:g}/s. Price: ${PRICE_PER_GPU_HOUR}/A100-hour, "
          f"ASSUMED ({PRICE_SOURCE}); $/M counts output tokens.\n")
    print("## Capacity (far more offered than served)\n\n" + capacity_table(results) + "\n")
    print(f"## Where p99 end-to-end reaches the story's {STORY_P99_S} s\n\n" + story_p99_table(results) + "\n")
    for r in results:
        if r.spread:
            print(f"{r.option.label}, the same rate with other seeds (other arrivals and lengths): " + ", ".join(
                f"p99 {q.p99_s:.2f} s (device {pct(q.s['busy'])} busy) at seed {q.argv[q.argv.index('--seed') + 1]}"
                for q in r.spread) + "\n")
    print("## p99 end-to-end against the offered rate\n")
    for r in results:
        pts = sorted(r.sweep, key=lambda q: q.rate)
        print(f"- {r.option.label}: " + ", ".join(f"{q.rate:.3g}/s {q.p99_s:.2f} s ({pct(q.s['busy'])} busy)"
                                                   for q in pts))
    if story.ceilings:
        print("\n## On the README's traffic (" + " ".join(README_TRAFFIC) + ")\n")
        print(f"The story's float32 server at {idle.rate:.3g} req/s (device {pct(idle.s['busy'])} busy): p99 e2e "
              f"{idle.p99_s:.2f} s, p50 {idle.s['e2e_ms']['p50'] / 1e3:.2f} s: `{command(idle.argv)}`\n")
        print("Continuous over static, at capacity:\n\n" + ratio_table(caps, story.ceilings) + "\n")
    print(f"## The modelled decode step (contexts of {DECODE_CONTEXT} tokens)\n\n" + curve_table(story.curve) + "\n")
    print("## Commands\n")
    for r in results:
        print(f"- {r.option.label}: `{command(r.capacity.argv)}`; sweep: `{command(r.sweep[0].argv)}`")
    if story.ceilings:
        for option in RATIO_RUNS:
            print(f"- {option.label}: `{command(caps[option.key].argv)}`")
    print(f"\n{run.count} jitney simulate invocations, {run.sim_wall:.0f} s of it in the simulations, "
          f"{wall:.0f} s wall in all, on {cpu_model()} ({os.cpu_count()} CPUs); every run's report under {run.out}")


def write_summary(story: Story, wall: float, path: Path) -> None:
    path.write_text(json.dumps(dict(
        results=[dict(key=r.option.key, label=r.option.label, gpus=r.option.gpus,
                      capacity=r.capacity.s | dict(argv=r.capacity.argv),
                      at_story_p99=(r.at_story_p99.s | dict(argv=r.at_story_p99.argv, rate=r.at_story_p99.rate))
                      if r.at_story_p99 else None, note=r.note,
                      sweep=[dict(rate=q.rate, p99_s=q.p99_s) for q in r.sweep],
                      spread=[q.s | dict(argv=q.argv) for q in r.spread]) for r in story.results],
        curve=story.curve, wall_s=wall), default=str, indent=1))


def write_figures(story: Story, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    plot_p99(story.results, folder / "story_p99_vs_rate.png")
    plot_cost(story.results, folder / "story_cost.png")
    plot_curve(story.curve, folder / "story_decode_curve.png")
    print(f"wrote {folder / 'story_p99_vs_rate.png'}, story_cost.png, story_decode_curve.png")
