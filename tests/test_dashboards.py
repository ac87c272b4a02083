"""deploy/grafana/jitney.json and deploy/prometheus/alerts.yml query only series jitney exports: the names are
taken from a real /metrics render (an app built over a tiny engine, with the replicas' collector fed one report
of a real engine's stats), so a renamed metric fails here, not on an operator's blank panel."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.app import ServerSettings, build_app
from batcher.config import BatcherConfig
from batcher.engine import Engine

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERIES = re.compile(r"\b(jitney_[a-z0-9_]+)")
PROMQL_WORDS = re.compile(r"\b([a-z_]+)\s*\(")  # function names, to tell them from series


def exported(tiny_runner, monkeypatch) -> set[str]:
    import replicas.metrics as replica_metrics
    from api.metrics import STEP_HISTOGRAMS

    engine = Engine(tiny_runner, BatcherConfig())
    report = {"replica": "r1", "pid": 1, "node": "n", "block_size": tiny_runner.block_size, "load": 0,
              "kv_usage": 0.0, "stats": asdict(engine.stats()), "cached_block_hashes": [],
              "histograms": {name: ([0] * (len(b) + 1), 0) for name, (b, _) in STEP_HISTOGRAMS.items()}}
    monkeypatch.setattr(replica_metrics, "replica_reports", lambda: {"r1": report})
    app = build_app(engine, ServerSettings(model_name="m"))
    metrics = app.metrics
    replica_metrics.install(metrics)
    text = metrics.render().decode()
    names = set()
    for family in text_string_to_metric_families(text):  # a labelled counter with no sample yet still counts
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes} | {s.name for s in family.samples}
    return names


def queried(text: str) -> set[str]:
    return set(SERIES.findall(text))


def test_grafana_dashboard_queries_only_exported_series(tiny_runner, monkeypatch):
    dashboard = json.loads((DEPLOY / "grafana" / "jitney.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    names = exported(tiny_runner, monkeypatch)
    missing = {n for e in exprs for n in queried(e)} - names
    assert not missing, f"the dashboard queries series jitney does not export: {sorted(missing)}"
    # what the issue asks a dashboard to show, each on some panel
    text = " ".join(exprs)
    for needed in ("jitney_generation_tokens_total", "jitney_time_to_first_token_seconds_bucket",
                   "jitney_inter_token_latency_seconds_bucket", "jitney_requests_running", "jitney_requests_waiting",
                   "jitney_kv_cache_usage_ratio", "jitney_preemptions_total", "jitney_replica_requests_running"):
        assert needed in text, needed
    assert all(t["expr"].count("(") == t["expr"].count(")") for p in dashboard["panels"] for t in p["targets"])


def test_alert_rules_query_only_exported_series(tiny_runner, monkeypatch):
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    exprs = re.findall(r"^\s*expr:\s*(.+)$", text, re.M)
    assert len(exprs) >= 8
    names = exported(tiny_runner, monkeypatch)
    missing = {n for e in exprs for n in queried(e)} - names
    assert not missing, f"alerts query series jitney does not export: {sorted(missing)}"
    for e in exprs:
        assert e.count("(") == e.count(")"), e
    yaml = pytest.importorskip("yaml")  # the structure too, where PyYAML is installed
    rules = yaml.safe_load(text)["groups"][0]["rules"]
    assert all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
