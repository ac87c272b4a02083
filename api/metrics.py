"""Prometheus metrics (prometheus-client), one registry per app so several servers can live in one process.

Engine state (queue, KV cache, counters) is read from engine.stats() at scrape time; latencies are observed
as each request ends, batch sizes as each step ends. Every series carries `model_name` (the served name), as
vLLM's do, so one dashboard can hold several models; it is added at render time to whatever the registry holds
(the replicas' collectors and the event-loop lag included), so no metric can be registered without it.
Names, units and their vLLM counterparts: docs/serving.md#metrics.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from batcher.engine_client import EngineClient
from batcher.request import RequestOutput
from batcher.stats import StepRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# The engine's series, one table for this registry and for replicas/metrics.py's per-replica copies:
# (name after jitney_, EngineStats field, help).
ENGINE_GAUGES = (("requests_waiting", "waiting", "Requests accepted but not started"),
                 ("requests_running", "running", "Sequences in the running batch"),
                 ("kv_cache_blocks_used", "kv_blocks_used", "KV-cache blocks in use"),
                 ("kv_cache_blocks_total", "kv_blocks_total", "KV-cache blocks"))
ENGINE_COUNTERS = (("preemptions", "preemptions", "Sequences preempted for KV memory"),
                   ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                                                    "(whole blocks)"),
                   ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache"),
                   ("prompt_tokens", "prompt_tokens", "Prompt tokens of finished requests"),
                   ("generation_tokens", "generation_tokens", "Tokens generated"),
                   ("engine_steps", "steps", "Model steps run"))
KV_USAGE_HELP = "Fraction of KV-cache blocks in use (0..1)"
FINISHED_HELP = "Requests ended, by finish reason"
# Per-step histograms: (bucket bounds, help). Replicas count into the same bounds, so their buckets add up.
STEP_HISTOGRAMS = {"batch_size": ((1, 2, 4, 8, 16, 32, 64, 128, 256), "Sequences per model step"),
                   "step_tokens": ((1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096), "Tokens per model step")}


class EngineCollector:
    def __init__(self, engine: EngineClient):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for metric, field, help_ in ENGINE_GAUGES:
            yield GaugeMetricFamily(f"jitney_{metric}", help_, value=getattr(s, field))
        yield GaugeMetricFamily("jitney_kv_cache_usage_ratio", KV_USAGE_HELP,
                                value=s.kv_blocks_used / max(s.kv_blocks_total, 1))
        for metric, field, help_ in ENGINE_COUNTERS:
            yield CounterMetricFamily(f"jitney_{metric}", help_, value=getattr(s, field))
        finished = CounterMetricFamily("jitney_requests_finished", FINISHED_HELP, labels=["reason"])
        for reason, n in sorted(s.finished_by_reason.items()):
            finished.add_metric([reason], n)
        yield finished
        for name, labels in self.engine.config_info().items():
            yield InfoMetricFamily(f"jitney_{name}_config", f"The {name}'s configuration", value=labels)


class WithModelName:
    """The registry's families with model_name added to every sample: one place, so no series can lack it."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        self.registry, self.model_name = registry, model_name

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s._replace(labels={"model_name": self.model_name, **s.labels}) for s in family.samples]
            yield family


def parse(text: str, model_name: str | None = None, strict: bool = True) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted label pairs without model_name): value}, for the benchmarks and
    tests that read /metrics back. Strict: every sample must carry model_name (that one, when given)."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            name = labels.pop("model_name", None)
            assert not strict or name is not None and model_name in (None, name), f"{s.name} {s.labels}"
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


class Metrics:
    def __init__(self, engine: EngineClient, model_name: str):
        self.registry = CollectorRegistry()
        self.labelled = WithModelName(self.registry, model_name)
        self.registry.register(EngineCollector(engine))
        r = self.registry
        self.queue_time = Histogram("jitney_queue_time_seconds", "Arrival to first scheduled", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.ttft = Histogram("jitney_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("jitney_inter_token_latency_seconds", "Between consecutive tokens", buckets=TOKEN_BUCKETS,
                             registry=r)
        self.e2e = Histogram("jitney_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.batch_size, self.step_tokens = (Histogram(f"jitney_{key}", help_, buckets=bounds, registry=r)
                                             for key, (bounds, help_) in STEP_HISTOGRAMS.items())
        self.http = Counter("jitney_http_requests", "HTTP requests by route and status", ["path", "status"], registry=r)
        engine.step_observers.append(self.observe_step)

    def observe_step(self, rec: StepRecord) -> None:
        self.batch_size.observe(rec.batch_size)
        self.step_tokens.observe(rec.num_tokens)

    def observe_request(self, out: RequestOutput) -> None:
        t = out.timings
        if t is None:
            return
        for hist, ms in ((self.queue_time, t.queue_ms), (self.ttft, t.ttft_ms), (self.e2e, t.total_ms)):
            if ms is not None:
                hist.observe(ms / 1000)
        for ms in t.inter_token_ms:
            self.itl.observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.labelled)
