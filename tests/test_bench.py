"""The bench: Azure windows and scales, synthetic arrivals and lengths, open-loop HTTP replay against a slow
server, and `jitney bench` end to end (HTTP with --start-server, and an in-process rate sweep) on tiny-random."""
import asyncio
import json
import statistics
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from benchmarks.azure import DEFAULT_PATH, azure_lengths, azure_trace, find_trace
from benchmarks.bench import run_bench
from benchmarks.http_replay import replay_http
from benchmarks.trace import TraceRequest, arrival_times, lengths, offered_rate, rescale_time, synthetic

from .server_helpers import free_port

# --- traces --------------------------------------------------------------------------------------------------

def test_azure_trace_ships_with_the_repository():
    assert find_trace() == DEFAULT_PATH and DEFAULT_PATH.parent.joinpath("LICENSE-CC-BY-4.0.txt").is_file()


def test_azure_window_and_scales():
    base = azure_trace(start_s=600, duration_s=60)
    assert 200 < len(base.requests) < 600  # ~5.5 req/s in that hour
    assert base.requests[0].arrival_s == 0 and base.requests[-1].arrival_s < 60
    slow = azure_trace(start_s=600, duration_s=60, time_scale=2, token_scale=4)
    assert len(slow.requests) == len(base.requests)
    for a, b in zip(base.requests, slow.requests):
        assert b.arrival_s == pytest.approx(2 * a.arrival_s, abs=1e-5)  # gaps doubled
        assert b.prompt_tokens == max(1, round(a.prompt_tokens / 4))   # lengths quartered
        assert b.output_tokens == max(1, round(a.output_tokens / 4))
    assert "time scale 2" in slow.describe() and "token scale 4" in slow.describe()
    capped = azure_trace(start_s=600, duration_s=60, max_requests=10, max_prompt_tokens=100)
    assert len(capped.requests) == 10 and max(r.prompt_tokens for r in capped.requests) <= 100
    pairs = azure_lengths(token_scale=4)
    assert len(pairs) > 19_000 and statistics.median(p for p, _ in pairs) == pytest.approx(1020 / 4, rel=0.05)


def test_azure_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Azure trace not found.*nope.csv.*TIMESTAMP"):
        azure_trace(tmp_path / "nope.csv")


def test_gamma_arrivals_keep_the_mean_rate_and_are_burstier():
    gamma = arrival_times(4000, 5.0, "gamma", shape=0.25, seed=1)
    poisson = arrival_times(4000, 5.0, "poisson", seed=1)
    for times in (gamma, poisson):
        assert times[0] == 0 and times == sorted(times)
        assert offered_rate([TraceRequest(t, 1, 1) for t in times]) == pytest.approx(5.0, rel=0.1)

    def cv(times):
        gaps = [b - a for a, b in zip(times, times[1:])]
        return statistics.pstdev(gaps) / statistics.mean(gaps)
    assert cv(poisson) == pytest.approx(1.0, abs=0.1) and cv(gamma) == pytest.approx(2.0, abs=0.3)


def test_length_distributions_and_rate_independence():
    for dist in ("fixed", "uniform", "exponential"):
        pairs = lengths(500, dist, (16, 256), (8, 64), seed=2)
        assert all(16 <= p <= 256 and 8 <= o <= 64 for p, o in pairs), dist
    assert set(lengths(5, "fixed", (10, 20), (4, 4))) == {(15, 4)}
    assert set(lengths(50, "azure", None, (1, 3), empirical=[(7, 9), (5, 1)])) == {(7, 3), (5, 1)}
    # A rate sweep changes when requests come, never what they are.
    fast, slow = synthetic(30, 10.0, (4, 64), (4, 64)), synthetic(30, 1.0, (4, 64), (4, 64))
    assert [(r.prompt_tokens, r.output_tokens) for r in fast] == [(r.prompt_tokens, r.output_tokens) for r in slow]
    assert offered_rate(rescale_time(fast, 3.0)) == pytest.approx(offered_rate(fast) / 3)


# --- open-loop HTTP replay -------------------------------------------------------------------------------------

def slow_sse_app(delay_s: float) -> Starlette:
    """A stand-in server that sleeps delay_s before its first token; max_tokens 99 is refused with a 429."""
    async def completions(request: Request):
        body = await request.json()
        if body["max_tokens"] == 99:
            return JSONResponse({"error": {"message": "busy", "type": "overloaded", "code": "overloaded"}}, 429)

        async def events():
            await asyncio.sleep(delay_s)
            for i in range(body["max_tokens"]):
                yield f'data: {json.dumps({"choices": [{"text": "", "finish_reason": None}]})}\n\n'
                await asyncio.sleep(0.01)
            yield f'data: {json.dumps({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})}\n\n'
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture
def slow_server():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(slow_sse_app(0.5), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


async def test_http_replay_is_open_loop_against_a_slow_server(slow_server):
    # 40 requests 25 ms apart, each answered after 0.5 s: ~20 are in flight at once, none may wait to be sent.
    trace = [TraceRequest(0.025 * i, 3, 99 if i == 7 else 3) for i in range(40)]
    records = await replay_http(slow_server, trace, [[1, 2, 3]] * 40, progress=False)
    lags = [r.submitted_s - r.arrival_s for r in records]
    # A closed-loop client would lag by the 0.5 s service time per request; 0.2 s allows a busy machine.
    assert all(0 <= lag < 0.2 for lag in lags), max(lags)
    refused = records.pop(7)
    assert refused.refused and refused.status == 429 and "busy" in refused.error and not refused.ok
    for r in records:
        assert r.ok and r.status == 200 and r.output_tokens == 3, r
        # The server sleeps 0.5 s before its first chunk and 10 ms after each: the last chunk leaves >= 0.52 s
        # after the request. A busy client may read the first chunk late, so gaps between chunks as seen by the
        # client can shrink; only their sum is pinned. The two clocks may disagree by a fraction of a ms.
        assert 490 <= r.ttft_ms < 1500 and r.total_ms >= 515 and len(r.inter_token_ms) == 2
        assert sum(r.inter_token_ms) == pytest.approx(r.total_ms - r.ttft_ms, abs=1.0)


# --- the command end to end ------------------------------------------------------------------------------------

TINY = ["--model", "tiny-random", "--dtype", "float32", "--prompt-len", "4,24", "--output-len", "4,12",
        "--no-progress"]


def test_bench_with_started_servers_writes_table_json_and_plots(tmp_path, capsys):
    result = run_bench(TINY + ["--start-server", "--policies", "sequential,continuous", "--num-requests", "8",
                               "--rate", "16", "--hourly-cost", "1.5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| sequential |" in out and "| continuous |" in out and "TTFT p99" in out
    assert {"report.md", "results.json", "latency_cdf.png", "timeline.png"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in saved["runs"]] == ["sequential", "continuous"] == [r["label"] for r in result["runs"]]
    for run in saved["runs"]:
        s = run["summary"]
        assert s["completed"] == 8 and s["output_tok_s"] > 0 and s["cost_per_mtok"] > 0, s
        assert s["mean_batch"] >= 1 and s["kv_usage_max"] is not None and s["preemptions"] == 0  # from /metrics
        assert len(run["records"]) == 8 and all(r["status"] == 200 for r in run["records"])
        assert run["timeline"]["t"] and s["submit_lag_ms_max"] < 200
    assert saved["runs"][0]["summary"]["mean_batch"] == 1.0  # sequential, read back from jitney_batch_size


def test_bench_rate_sweep_in_process(tmp_path):
    result = run_bench(TINY + ["--workload", "gamma", "--policies", "dynamic,continuous", "--num-requests", "6",
                               "--sweep-rates", "20,40", "--out", str(tmp_path)])
    assert [(r["policy"], r["x"]) for r in result["runs"]] == [("dynamic", 20), ("continuous", 20),
                                                               ("dynamic", 40), ("continuous", 40)]
    assert all(r["summary"]["completed"] == 6 for r in result["runs"])
    assert result["runs"][2]["summary"]["offered_req_s"] > result["runs"][0]["summary"]["offered_req_s"]
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_docs_tables_are_written_from_result_files(tmp_path, capsys):
    from benchmarks.replay import RequestRecord
    from benchmarks.report import COLUMNS, summarize
    from benchmarks.tables import main as tables_main

    rec = RequestRecord(0.0, 0.0, 8, output_tokens=4, finished_s=1.0, ttft_ms=100.0, total_ms=400.0,
                        inter_token_ms=[100.0] * 3)
    (tmp_path / "results" / "readme").mkdir(parents=True)
    (tmp_path / "results" / "readme" / "results.json").write_text(json.dumps(
        {"runs": [{"label": "continuous", "summary": summarize([rec], 1.0)}]}))
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "page.md"
    doc.write_text("text\n<!-- table: policies -->\n| old |\n<!-- /table -->\n"
                   "<!-- table: prefix -->\n| kept |\n<!-- /table -->\n")
    missing = tables_main(["--results", str(tmp_path / "results"), "--docs", str(tmp_path / "docs")])
    text = doc.read_text()
    assert "| old |" not in text and "| " + " | ".join(COLUMNS) + " |" in text and "| continuous | - | 1/1 | 4 |" in text
    assert missing == {"prefix"} and "| kept |" in text and "no results for prefix" in capsys.readouterr().out
