"""What the routers of this process know, kept where /metrics can read it.

Ray Serve ships a request router's own module by value (cloudpickle), so a global in router.py would be a copy
that only the router sees; this module travels by reference, so the router and the front end share it.
"""
from __future__ import annotations

import weakref
from collections import Counter

DECISIONS: Counter = Counter()   # (policy, decision) -> requests routed
PREFIX_HIT_TOKENS = Counter()    # "tokens" -> prompt tokens routed to a replica that held their KV blocks
ROUTERS: weakref.WeakSet = weakref.WeakSet()


def replica_reports() -> dict[str, dict]:
    """The latest report of every replica the routers in this process know, by replica id."""
    out = {}
    for router in list(ROUTERS):
        for r in list(router.curr_replicas.values()):
            stats = r.routing_stats or {}
            if stats.get("replica"):
                out[stats["replica"]] = stats
    return out
