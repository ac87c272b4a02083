"""The highest rate that passes a test, by bisection: what `jitney plan` asks of each configuration.

The test is a simulation at that rate (does one replica meet the SLOs?). It is taken to be monotone: a replica
that meets the SLOs at some rate meets them at any lower one. Rates are bisected geometrically (the midpoint of
lo and hi is sqrt(lo x hi)), because the tolerance is relative: a 5 % error in a rate is a 5 % error in the
replica count, whether the rate is 0.5 or 500 req/s.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Search:
    """lo: the highest rate that passed (0: none did); hi: the lowest that failed (or the ceiling, assumed to
    fail); probes: every (rate, passed) in the order tried."""
    lo: float
    hi: float
    probes: list[tuple[float, bool]] = field(default_factory=list)


def highest_passing(passes: Callable[[float], bool], ceiling: float, tolerance: float = 0.05,
                    max_halvings: int = 6) -> Search:
    """Bisects (0, ceiling) for the highest rate where passes(rate) holds, to within `tolerance` relative
    (hi / lo <= 1 + tolerance on return, unless nothing passed).

    The ceiling is not probed: it is a rate at which the test is known to fail (for `jitney plan`, the
    replica's saturated throughput, at or above which its queue grows without bound). The search first halves
    down from it until a rate passes (at most max_halvings times: a replica that fails at ceiling / 2^6 fails its
    SLOs with a queue 64 times shorter than at saturation, and lo = 0 says so), then bisects lo..hi.
    Every probe keeps the invariant: lo passed (or is 0), hi failed (or is the ceiling), lo < hi."""
    if not ceiling > 0 or not tolerance > 0:
        raise ValueError(f"want a positive ceiling and tolerance, got {ceiling!r} and {tolerance!r}")
    s = Search(0.0, ceiling)

    def probe(rate: float) -> bool:
        ok = bool(passes(rate))
        s.probes.append((rate, ok))
        if ok:
            s.lo = rate
        else:
            s.hi = rate
        return ok

    for _ in range(max_halvings):
        if probe(s.hi / 2):
            break
    else:
        return s
    while s.hi / s.lo > 1 + tolerance:
        probe(math.sqrt(s.lo * s.hi))
    return s


def probes_needed(tolerance: float, halvings: int = 1) -> int:
    """How many probes a search whose first halving passes takes: one halving, then bisections of the factor-2
    bracket until it is within the tolerance (log2(ln 2 / ln(1 + tolerance)) of them, rounded up)."""
    return halvings + max(0, math.ceil(math.log2(math.log(2) / math.log1p(tolerance))))
