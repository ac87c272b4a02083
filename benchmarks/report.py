"""From request records to figures: throughput, latency percentiles, batch size; and the Markdown tables."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from batcher.stats import StepRecord

from .replay import RequestRecord


def wall_seconds(records: list[RequestRecord]) -> float:
    """From the first arrival to the last finish: the time the whole trace took to serve."""
    ends = [r.finished_s for r in records if r.finished_s is not None]
    return max(ends) - min(r.arrival_s for r in records) if ends else 0.0


def percentiles(values: list[float | None], ps: tuple[int, ...]) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)  # HTTP has no queue time, for one
    return {f"p{p}": float(np.percentile(arr, p)) if arr.size else None for p in ps}


def tpot_ms(r: RequestRecord) -> float | None:
    """Time per output token after the first: the decode speed this request saw."""
    if r.total_ms is None or r.ttft_ms is None:
        return None
    return (r.total_ms - r.ttft_ms) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def meets_slo(r: RequestRecord, ttft_ms: float | None, tpot: float | None) -> bool:
    return (r.ok and (ttft_ms is None or r.ttft_ms <= ttft_ms)
            and (tpot is None or (t := tpot_ms(r)) is not None and t <= tpot))


def summarize(records: list[RequestRecord], wall_s: float, step_log: list[StepRecord] | None = None,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    """Figures of one run. Latencies are over completed requests; throughput counts only their tokens; goodput
    counts the requests that met both SLOs (a missing SLO always holds)."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in ok)
    return dict(
        requests=len(records), completed=len(ok), refused=sum(r.refused for r in records),
        errors=sum(r.error is not None for r in records), output_tokens=out_tokens,
        prompt_tokens=sum(r.prompt_tokens for r in ok), wall_s=wall_s,
        output_tok_s=out_tokens / wall_s if wall_s else 0.0,
        req_s=len(ok) / wall_s if wall_s else 0.0,
        slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, good_requests=good,
        goodput_req_s=good / wall_s if wall_s else 0.0,
        queue_ms=percentiles([r.queue_ms for r in ok], (50, 99)),
        ttft_ms=percentiles([r.ttft_ms for r in ok], (50, 90, 99)),
        inter_token_ms=percentiles([g for r in ok for g in r.inter_token_ms], (50, 90, 99)),
        tpot_ms=percentiles([tpot_ms(r) for r in ok], (50, 90, 99)),
        e2e_ms=percentiles([r.total_ms for r in ok], (50, 90, 99)),
        # Open-loop check: how late the replay sent requests (large values mean the client, not the engine, lagged).
        submit_lag_ms_max=max((1000 * (r.submitted_s - r.arrival_s) for r in records), default=None),
        mean_batch=float(np.mean([s.batch_size for s in step_log])) if step_log else None,
        steps=len(step_log) if step_log is not None else None,
        preemptions=sum(s.preempted for s in step_log) if step_log is not None else None,
    )


def fmt_ms(ms: float | None) -> str:
    """Milliseconds below a second, seconds above: latencies here span four orders of magnitude."""
    if ms is None:
        return "-"
    return f"{ms:,.0f} ms" if ms < 1000 else f"{ms / 1000:,.2f} s"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --- engine-side figures, and the tables every bench prints ---------------------------------------------------

def step_figures(step_log: list[StepRecord], num_blocks: int, t0: float,
                 max_points: int = 4000) -> tuple[dict, dict[str, list[float]]]:
    """In-process, from the step log: mean batch size, KV-cache usage (mean weighted by step time, and max),
    preemptions; and the timeline of batch size, queue length and KV usage (thinned to max_points)."""
    if not step_log:
        return dict(mean_batch=None, kv_usage_mean=None, kv_usage_max=None, preemptions=0, steps=0), {}
    kv = np.array([s.kv_blocks_used for s in step_log]) / num_blocks
    secs = np.array([s.seconds for s in step_log])
    points = []  # (t, running, waiting, kv usage)
    for s, nxt, usage in zip(step_log, step_log[1:] + [None], kv):
        points.append((s.start - t0, s.batch_size, s.waiting, float(usage)))
        end = s.start + s.seconds
        if nxt is None or nxt.start - end > 0.01:  # the engine went idle: nothing ran, waited or held KV
            points.append((end - t0, 0, 0, 0.0))
    t, running, waiting, kv_usage = (list(c) for c in zip(*points[::max(1, len(points) // max_points)]))
    timeline = dict(t=t, running=running, waiting=waiting, kv_usage=kv_usage)
    return dict(mean_batch=float(np.mean([s.batch_size for s in step_log])), steps=len(step_log),
                kv_usage_mean=float(np.average(kv, weights=secs)) if secs.sum() else float(kv.mean()),
                kv_usage_max=float(kv.max()), preemptions=sum(s.preempted for s in step_log)), timeline


def cost_per_million(hourly_cost: float | None, output_tok_s: float) -> float | None:
    """USD per million output tokens, were the machine kept this busy for an hour."""
    return hourly_cost / (output_tok_s * 3600) * 1e6 if hourly_cost and output_tok_s else None


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


COLUMNS = ["run", "offered req/s", "done", "output tok/s", "req/s", "goodput req/s", "mean batch", "KV mean / max",
           "CPU % machine / server", "preempt", "$/M out tok"]


def throughput_table(runs: list[tuple[str, dict]]) -> str:
    rows = []
    for label, s in runs:
        kv = "-" if s.get("kv_usage_mean") is None else f"{s['kv_usage_mean']:.1%} / {s['kv_usage_max']:.1%}"
        cpu = f"{_num(s.get('cpu_pct'), '.0f')} / {_num(s.get('server_cpu_pct'), '.0f')}"
        rows.append([label, _num(s.get("offered_req_s"), ".2f"), f"{s['completed']}/{s['requests']}",
                     f"{s['output_tok_s']:,.0f}", f"{s['req_s']:.2f}", f"{s['goodput_req_s']:.2f}",
                     _num(s["mean_batch"], ".1f"), kv, cpu, _num(s["preemptions"], "d"),
                     _num(s.get("cost_per_mtok"), ",.2f")])
    return _table(COLUMNS, rows)


def latency_table(runs: list[tuple[str, dict]]) -> str:
    kinds = (("TTFT", "ttft_ms"), ("ITL", "inter_token_ms"), ("e2e", "e2e_ms"))
    header = ["run"] + [f"{name} p{p}" for name, _ in kinds for p in (50, 90, 99)]
    return _table(header, [[label] + [fmt_ms(s[key][f"p{p}"]) for _, key in kinds for p in (50, 90, 99)]
                           for label, s in runs])


DIGEST = ["run", "output tok/s", "goodput req/s", "TTFT p50", "TTFT p99", "ITL p99", "e2e p99", "mean batch",
          "preemptions"]


def digest_table(runs: list[tuple[str, dict]]) -> str:
    """One line a run, the figures a sweep is read by: what the docs print beside each knob."""
    return _table(DIGEST, [[label, f"{s['output_tok_s']:,.0f}", f"{s['goodput_req_s']:.2f}",
                            fmt_ms(s["ttft_ms"]["p50"]), fmt_ms(s["ttft_ms"]["p99"]),
                            fmt_ms(s["inter_token_ms"]["p99"]), fmt_ms(s["e2e_ms"]["p99"]),
                            _num(s["mean_batch"], ".1f"), _num(s["preemptions"], "d")] for label, s in runs])


def ratio_table(runs: list[tuple[str, dict]], base: str = "continuous") -> str | None:
    """How the base run compares with each other one: its throughput multiple, and how many times lower its p99
    end-to-end latency is (None unless the base ran beside others)."""
    rows = dict(runs)
    if base not in rows or len(rows) < 2:
        return None
    b, lines = rows[base], []
    for label, s in rows.items():
        if label == base:
            continue
        tput = b["output_tok_s"] / s["output_tok_s"] if s["output_tok_s"] else float("inf")
        lat = s["e2e_ms"]["p99"] / b["e2e_ms"]["p99"] if s["e2e_ms"]["p99"] and b["e2e_ms"]["p99"] else None
        lines.append([label, f"{tput:.2f}x", "-" if lat is None else f"{lat:.2f}x"])
    return _table([f"{base} vs", "output tok/s (x higher)", "p99 e2e (x lower)"], lines)


@dataclass
class Run:
    """One replay of the bench: a policy (and a swept value) against one trace."""
    label: str
    policy: str
    x: float | None                    # the swept value (offered rate or knob), None outside a sweep
    records: list[RequestRecord]
    summary: dict
    timeline: dict[str, list[float]]   # t (s since the trace's zero), running, waiting, kv_usage


def ints(text: str) -> list[int]:
    """A command's comma-separated integers ("1,64,512")."""
    return [int(v) for v in text.split(",")]


def finish(report: dict, json_path: str | None, started: float) -> dict:
    """The end of every benchmark command: its run time, and its figures saved as JSON when asked."""
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
