"""PNG figures of a bench (matplotlib, Agg): latency CDFs, the sweep's knee, batch and queue over time.

Outside a sweep every panel has one line per policy. In a sweep each policy gets its own row of panels and one
line per swept value, so sixteen runs stay readable.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from .report import Run  # noqa: E402

Rows = list[tuple[str | None, list[tuple[str, Run]]]]


def _rows(runs: list[Run], sweep_name: str | None) -> Rows:
    if sweep_name is None:
        return [(None, [(r.label, r) for r in runs])]
    policies = dict.fromkeys(r.policy for r in runs)
    name = "{:g} req/s" if sweep_name == "rate" else sweep_name + "={:g}"
    return [(p, [(name.format(r.x), r) for r in runs if r.policy == p]) for p in policies]


def _log_axis(axis) -> None:
    """Log scale labelled 0.1, 0.2, 0.5, 1, 2, ... in plain numbers (matplotlib's 2x10^-1 minor labels collide)."""
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(runs: list[Run], path: Path, title: str, sweep_name: str | None = None) -> Path:
    """Fraction of completed requests served within x seconds, for TTFT and end-to-end latency."""
    rows = _rows(runs, sweep_name)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.8 * len(rows) + 0.6), squeeze=False)
    for (row_title, lines), row_axes in zip(rows, axes):
        for ax, attr, name in zip(row_axes, ("ttft_ms", "total_ms"), ("time to first token", "end-to-end latency")):
            for label, run in lines:
                v = np.sort([getattr(r, attr) / 1000 for r in run.records if r.ok])
                if v.size:
                    ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label)
            ax.set_xscale("log")  # latencies span milliseconds to minutes
            _log_axis(ax.xaxis)
            ax.set_xlabel(f"{name} (s, log scale)")
            ax.set_ylabel("fraction of requests")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{row_title}: {name}" if row_title else name, fontsize=10)
            ax.legend(fontsize=8, loc="best")
    return _save(fig, path, title)


def timelines(runs: list[Run], path: Path, title: str, sweep_name: str | None = None) -> Path:
    """Running batch size, waiting queue length and KV-cache usage against time since the replay started."""
    rows = _rows(runs, sweep_name)
    panels = (("running", "running batch (sequences)"), ("waiting", "waiting queue (requests)"),
              ("kv_usage", "KV-cache usage (%)"))
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 3.4 * len(rows) + 0.6), squeeze=False)
    for (row_title, lines), row_axes in zip(rows, axes):
        for ax, (key, name) in zip(row_axes, panels):
            for label, run in lines:
                t, v = run.timeline.get("t", []), run.timeline.get(key, [])
                pts = [(a, 100 * b if key == "kv_usage" else b) for a, b in zip(t, v) if b is not None]
                if pts:
                    ax.step(*zip(*pts), where="post", label=label, linewidth=1)
            ax.set_xlabel("time since the replay started (s)")
            ax.set_ylabel(name)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{row_title}: {name}" if row_title else name, fontsize=10)
            ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path, title)


def sweep(runs: list[Run], path: Path, title: str, x_label: str, log_x: bool) -> Path:
    """Throughput, goodput and p99 latency against the swept value, one line per policy: where the knee is."""
    policies = dict.fromkeys(r.policy for r in runs)
    fig, (a_tok, a_good, a_p99) = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, policy in enumerate(policies):
        own = sorted((r for r in runs if r.policy == policy), key=lambda r: r.x)
        xs, color = [r.x for r in own], f"C{i}"
        a_tok.plot(xs, [r.summary["output_tok_s"] for r in own], "o-", color=color, label=policy)
        a_good.plot(xs, [r.summary["goodput_req_s"] for r in own], "o-", color=color, label=policy)
        for key, style, name in (("e2e_ms", "o-", "e2e"), ("ttft_ms", "s--", "TTFT")):
            p99 = [r.summary[key]["p99"] for r in own]
            a_p99.plot([x for x, v in zip(xs, p99) if v], [v / 1000 for v in p99 if v], style, color=color,
                       label=f"{policy} {name}")
    s, xs_all = runs[0].summary, sorted({r.x for r in runs})
    labels = ((a_tok, "output tokens/s"),
              (a_good, f"goodput (req/s within TTFT {s['slo_ttft_ms']:g} ms, TPOT {s['slo_tpot_ms']:g} ms)"),
              (a_p99, "p99 latency (s, log scale)"))
    for ax, y_label in labels:
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label, fontsize=9)
        if log_x:  # symlog when 0 is one of the values (max_wait_ms=0): log has no room for it
            positive = [x for x in xs_all if x > 0]
            ax.set_xscale("symlog", linthresh=min(positive)) if min(xs_all) <= 0 else ax.set_xscale("log")
            ax.set_xticks(xs_all)  # the swept values themselves, in plain numbers
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    a_p99.set_yscale("log")
    _log_axis(a_p99.yaxis)
    for ax in (a_tok, a_good):
        ax.set_ylim(bottom=0)
    return _save(fig, path, title)
