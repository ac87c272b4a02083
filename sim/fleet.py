"""From each configuration's sustainable rate to a fleet: replicas for a target rate, its cost, the ranking
table and the plot of fleet cost against the target rate (`jitney plan`'s report).

A fleet of n replicas is taken to serve n times one replica's rate: a router that splits Poisson arrivals
evenly (each replica then sees Poisson arrivals at 1/n of the rate, the very workload its search replayed), no
replica shared between configurations, and no headroom beyond the search's own tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .probe import Outcome


@dataclass(frozen=True)
class Fleet:
    replica_hourly: float   # USD per hour of one replica (tp devices)
    replicas: int
    hourly: float           # USD per hour of the fleet
    per_mtok: float         # USD per million output tokens at the target rate


def replicas_for(target: float, rate: float) -> int:
    # The product can land a rounding error above an integer (95 / 9.5): that is not a replica more.
    return max(1, math.ceil(target / rate * (1 - 1e-12)))


def fleet(o: Outcome, price: float, target: float, mean_output_tokens: float) -> Fleet | None:
    """None for a configuration that serves nothing (does not fit, or misses the SLOs at every rate)."""
    if o.rate <= 0:
        return None
    replica = price * o.config.tp
    n = replicas_for(target, o.rate)
    return Fleet(replica, n, n * replica, n * replica / (target * mean_output_tokens * 3600) * 1e6)


def ranked(outcomes: list[Outcome], prices: dict, target: float, mean_out: float
           ) -> list[tuple[Outcome, Fleet | None]]:
    """Cheapest fleet first (then the cheaper replica, then the label: a stable order); the configurations
    that serve nothing last, those that miss the SLOs before those that do not fit."""
    rows = [(o, fleet(o, prices[o.config.device][0], target, mean_out)) for o in outcomes]
    return sorted(rows, key=lambda r: (r[1] is None, r[0].status == "does not fit",
                                       r[1].hourly if r[1] else 0.0, r[1].replica_hourly if r[1] else 0.0,
                                       r[0].config.label))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} ms" if v < 1000 else f"{v / 1000:,.2f} s"


def table(rows: list[tuple[Outcome, Fleet | None]], target: float) -> str:
    head = ["#", "configuration", "$/hour per replica", "saturated req/s", "max req/s within SLOs",
            "TTFT p90 there", "ITL p99 there", "above it, fails on", f"replicas for {target:g} req/s",
            "fleet $/hour", "$/M output tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (o, f) in enumerate(rows, 1):
        if f is None:
            cells = ["-", f"{o.capacity:,.3g}" if o.capacity else "-", o.status + (f": {o.reason}" if o.reason
                                                                             else "")] + ["-"] * 6
        else:
            cells = [f"${f.replica_hourly:,.2f}", f"{o.capacity:,.3g}", f"{o.rate:,.3g}", _ms(o.ttft_p90_ms),
                     _ms(o.itl_p99_ms), o.limit, f"{f.replicas:,}", f"${f.hourly:,.0f}", f"${f.per_mtok:,.3f}"]
        lines.append(f"| {i} | {o.config.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[tuple[Outcome, Fleet | None]], target: float) -> str:
    served = [(o, f) for o, f in rows if f is not None]
    if not served:
        return f"no configuration meets the SLOs: none can serve {target:g} req/s"
    (o, f), rest = served[0], served[1:4]
    line = (f"cheapest for {target:g} req/s: {f.replicas:,} x {o.config.label} (each {o.rate:,.3g} req/s within "
            f"the SLOs): ${f.hourly:,.0f}/hour, ${f.per_mtok:,.3f} per M output tokens")
    if rest:
        line += "\nrunners-up: " + "; ".join(f"{g.replicas:,} x {p.config.label} ${g.hourly:,.0f}/hour "
                                              f"(+{g.hourly / f.hourly - 1:.0%})" for p, g in rest)
    return line


def plot(rows: list[tuple[Outcome, Fleet | None]], target: float, path: Path, title: str, top: int = 8) -> Path:
    """Fleet $/hour against the target rate, for the `top` configurations cheapest at the target (steps: a
    replica more at each multiple of its rate) and the cheapest of all at each rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    served = [(o, f) for o, f in rows if f is not None]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    if served:
        lo = min(min(o.rate for o, _ in served), target) / 2
        xs = np.geomspace(lo, target * 4, 800)
        costs = {o.config.label: np.array([replicas_for(x, o.rate) * f.replica_hourly for x in xs]) for o, f in served}
        for o, f in served[:top]:
            ax.step(xs, costs[o.config.label], where="post", linewidth=1.2,
                    label=f"{o.config.label} ({o.rate:,.3g} req/s each)")
        ax.plot(xs, np.min(list(costs.values()), axis=0), "k--", linewidth=1, label="cheapest at each rate")
        ax.axvline(target, color="grey", linewidth=0.8)
        ax.annotate(f"target {target:g} req/s", (target, ax.get_ylim()[1]), fontsize=8, ha="right", va="top",
                    rotation=90)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("target rate (requests/s)")
    ax.set_ylabel("fleet cost (USD/hour)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title[:150], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
