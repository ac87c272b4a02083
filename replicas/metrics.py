"""/metrics across replicas, read from each replica's last report (so up to one report period old).

The front end's own registry (api/metrics.py) keeps what it sees itself: HTTP statuses and every request's
latencies (queue, TTFT, inter-token, end to end), observed as each request ends, whichever replica served it.
Its engine gauges and counters come from RemoteEngine.stats(), the replicas' reports added up. This collector
adds:
  - jitney_batch_size and jitney_step_tokens, merged (bucket counts add up: every replica uses the same bounds),
    in place of the front end's histograms, which see no steps;
  - jitney_replica_<metric>{replica="..."}: the same engine metrics and histograms for each replica, and
    jitney_replica_info{replica, pid, node} (1 per live replica);
  - jitney_routing_decisions{policy, decision} and jitney_routing_prefix_hit_tokens.
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from api.metrics import ENGINE_COUNTERS, ENGINE_GAUGES, FINISHED_HELP, KV_USAGE_HELP, STEP_HISTOGRAMS

from .board import DECISIONS, PREFIX_HIT_TOKENS, replica_reports


def histogram(name: str, key: str, bounds, groups: list[tuple[list[str], list[dict]]], labels: list[str],
              help_: str) -> HistogramMetricFamily:
    """One series per group of replica reports: their bucket counts and sums added."""
    fam = HistogramMetricFamily(name, help_, labels=labels)
    for label_values, group in groups:
        counts = [sum(r["histograms"][key][0][i] for r in group) for i in range(len(bounds) + 1)]
        cumulative, buckets = 0, []
        for bound, c in zip([*map(str, bounds), "+Inf"], counts):
            cumulative += c
            buckets.append((bound, cumulative))
        fam.add_metric(label_values, buckets, sum(r["histograms"][key][1] for r in group))
    return fam


class ReplicaCollector:
    def collect(self):
        reports = sorted(replica_reports().values(), key=lambda r: r["replica"])
        for key, (bounds, help_) in STEP_HISTOGRAMS.items():
            yield histogram(f"jitney_{key}", key, bounds, [([], reports)] if reports else [], [], help_)
            yield histogram(f"jitney_replica_{key}", key, bounds, [([r["replica"]], [r]) for r in reports],
                            ["replica"], help_ + ", per replica")
        for metric, field, help_ in ENGINE_GAUGES:
            fam = GaugeMetricFamily(f"jitney_replica_{metric}", help_ + ", per replica", labels=["replica"])
            for r in reports:
                fam.add_metric([r["replica"]], r["stats"][field])
            yield fam
        usage = GaugeMetricFamily("jitney_replica_kv_cache_usage_ratio", KV_USAGE_HELP + ", per replica",
                                  labels=["replica"])
        info = GaugeMetricFamily("jitney_replica_info", "1 per live replica: its process and node",
                                 labels=["replica", "pid", "node"])
        for r in reports:
            usage.add_metric([r["replica"]], r["kv_usage"])
            info.add_metric([r["replica"], str(r["pid"]), r["node"]], 1)
        yield from (usage, info)
        for metric, field, help_ in ENGINE_COUNTERS:
            fam = CounterMetricFamily(f"jitney_replica_{metric}", help_ + ", per replica", labels=["replica"])
            for r in reports:
                fam.add_metric([r["replica"]], r["stats"][field])
            yield fam
        finished = CounterMetricFamily("jitney_replica_requests_finished", FINISHED_HELP + ", per replica",
                                       labels=["replica", "reason"])
        for r in reports:
            for reason, n in sorted(r["stats"]["finished_by_reason"].items()):
                finished.add_metric([r["replica"], reason], n)
        yield finished
        decisions = CounterMetricFamily("jitney_routing_decisions", "Routing decisions, by policy and decision "
                                        "(prefix_hit, prefix_spill: the matching replicas were overloaded, "
                                        "prefix_miss, p2c, round_robin); a request Serve routes again (every "
                                        "replica at its limit) is decided again", labels=["policy", "decision"])
        for (policy, kind), n in sorted(DECISIONS.items()):
            decisions.add_metric([policy, kind], n)
        yield decisions
        yield CounterMetricFamily("jitney_routing_prefix_hit_tokens", "Prompt tokens routed to a replica that held "
                                  "their KV blocks", value=PREFIX_HIT_TOKENS["tokens"])


def install(metrics) -> None:
    """Swaps the front end's step histograms (no steps run there) for the replicas' merged ones."""
    metrics.registry.unregister(metrics.batch_size)
    metrics.registry.unregister(metrics.step_tokens)
    metrics.registry.register(ReplicaCollector())
