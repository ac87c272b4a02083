"""/metrics as dashboards read it: every series carries model_name, the prefix cache is counted (queries and
hits, in tokens, so rate() gives a hit rate over any window), ratios and times say their unit, and the cache's
and engine's configuration are info series. In-process (Metrics over a tiny engine): no server needed."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from api.metrics import Metrics, parse
from batcher.config import BatcherConfig

from .engine_helpers import greedy, run_requests

UNITS = ("_seconds", "_ratio", "_tokens", "_info", "_total", "_blocks_used", "_blocks_total", "_size")


async def test_series_labels_units_and_prefix_counters(tiny_runner):
    shared = list(range(3, 3 + 4 * tiny_runner.block_size))  # four whole blocks both prompts start with
    prompts = [shared + [100, 101], shared + [200, 201, 202]]
    cfg = BatcherConfig(enable_prefix_caching=True)
    # one after the other: the second finds the first's blocks in the cache
    _, stats = await run_requests(tiny_runner, cfg, prompts, [greedy(2), greedy(2)], offsets=[0, 0.5])
    assert stats.prefix_cache_hits >= 4 * tiny_runner.block_size
    assert stats.prefix_cache_queries >= stats.prefix_cache_hits

    from batcher.engine import Engine
    engine = Engine(tiny_runner, cfg)
    engine.stats = lambda: stats  # the finished run's counts, read as a scrape would read them
    text = Metrics(engine, "served-name").render().decode()
    families = list(text_string_to_metric_families(text))
    for family in families:
        for sample in family.samples:
            assert sample.labels.get("model_name") == "served-name", sample
        if family.name.startswith("jitney_") and family.type != "info" and not family.name.endswith("_created"):
            assert family.name.endswith(UNITS) or family.type == "counter" or family.name in (
                "jitney_requests_waiting", "jitney_requests_running"), f"{family.name}: no unit in the name"
    m = parse(text, "served-name")
    assert m[("jitney_prefix_cache_hits_total", ())] == stats.prefix_cache_hits
    assert m[("jitney_prefix_cache_queries_total", ())] == stats.prefix_cache_queries
    cache = dict(next(labels for name, labels in m if name == "jitney_cache_config_info"))
    assert cache["block_size"] == str(tiny_runner.block_size) and cache["enable_prefix_caching"] == "true"
    assert int(cache["num_blocks"]) == engine.scheduler.num_blocks
    info = dict(next(labels for name, labels in m if name == "jitney_engine_config_info"))
    assert info["threads"] == str(tiny_runner.threads) and info["policy"] == "continuous"
    assert info["quant_dense_rows"] == "off" and info["quant_dense_weights"] == "slices"  # tiny_runner: unquantized
