"""From request records to figures: throughput, latency percentiles, batch size; and the Markdown tables."""
from __future__ import annotations

import numpy as np

from batcher.engine import StepRecord

from .replay import RequestRecord

COLUMNS = ["policy", "output tok/s", "req/s", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99", "mean batch",
           "preemptions"]


def wall_seconds(records: list[RequestRecord]) -> float:
    """From the first arrival to the last finish: the time the whole trace took to serve."""
    ends = [r.finished_s for r in records if r.finished_s is not None]
    return max(ends) - min(r.arrival_s for r in records) if ends else 0.0


def percentiles(values: list[float], ps: tuple[int, ...]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float)
    return {f"p{p}": float(np.percentile(arr, p)) if arr.size else None for p in ps}


def summarize(records: list[RequestRecord], wall_s: float, step_log: list[StepRecord] | None = None) -> dict:
    """Figures of one run. Latencies are over completed requests; throughput counts only their tokens."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return dict(
        requests=len(records), completed=len(ok), refused=sum(r.refused for r in records),
        errors=sum(r.error is not None for r in records), output_tokens=out_tokens,
        prompt_tokens=sum(r.prompt_tokens for r in ok), wall_s=wall_s,
        output_tok_s=out_tokens / wall_s if wall_s else 0.0,
        req_s=len(ok) / wall_s if wall_s else 0.0,
        queue_ms=percentiles([r.queue_ms for r in ok], (50, 99)),
        ttft_ms=percentiles([r.ttft_ms for r in ok], (50, 90, 99)),
        inter_token_ms=percentiles([g for r in ok for g in r.inter_token_ms], (50, 99)),
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


def _row(policy: str, s: dict) -> list[str]:
    batch = "-" if s["mean_batch"] is None else f"{s['mean_batch']:.1f}"
    return [policy, f"{s['output_tok_s']:,.0f}", f"{s['req_s']:.2f}", fmt_ms(s["ttft_ms"]["p50"]),
            fmt_ms(s["ttft_ms"]["p99"]), fmt_ms(s["e2e_ms"]["p50"]), fmt_ms(s["e2e_ms"]["p99"]), batch,
            "-" if s["preemptions"] is None else str(s["preemptions"])]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown_table(rows: dict[str, dict]) -> str:
    """One line per policy: summaries keyed by policy name, in the order given."""
    return _table(COLUMNS, [_row(p, s) for p, s in rows.items()])


def ratio_table(rows: dict[str, dict], base: str = "continuous") -> str:
    """How base compares with every other policy: throughput multiple, and how many times lower its p99 e2e is."""
    b = rows[base]
    lines = []
    for p, s in rows.items():
        if p == base:
            continue
        tput = b["output_tok_s"] / s["output_tok_s"] if s["output_tok_s"] else float("inf")
        lat = s["e2e_ms"]["p99"] / b["e2e_ms"]["p99"] if s["e2e_ms"]["p99"] and b["e2e_ms"]["p99"] else None
        lines.append([p, f"{tput:.2f}x", "-" if lat is None else f"{lat:.2f}x"])
    return _table([f"{base} vs", "output tok/s (x higher)", "p99 e2e (x lower)"], lines)
