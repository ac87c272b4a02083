"""Open-loop replay of a trace against a running server over HTTP, streaming: one RequestRecord per request.

Each request is its own task that sleeps until its arrival time and then sends POST /v1/completions with
"stream": true, the prompt as token ids (so its length is exact), "max_tokens" = the trace's output length and
"ignore_eos": true (so is that one). The connection pool is unbounded, so a slow server never holds back a send.

What the client sees, and so what the figures mean:
- TTFT is submission -> the first data chunk that carries a choice, whatever its text (an empty text still
  marks a token). jitney sends no chunk for a token whose text it holds back (half a UTF-8 character, a
  possible stop string), so such a first token is seen with the next one: at most a step late.
- inter-token times are the gaps between consecutive chunks; a chunk may carry more than one token for the
  same reason, so the count of gaps can be below output_tokens - 1.
- output_tokens comes from the final usage chunk (stream_options.include_usage).
- A 429 is recorded as refused, other statuses and transport errors as errors: nothing is raised.
Alongside, /metrics is sampled every `interval` seconds for the engine's side: batch size, queue, KV cache.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from tqdm import tqdm

from .replay import RequestRecord
from .trace import TraceRequest

METRICS = ("jitney_requests_running", "jitney_requests_waiting", "jitney_kv_cache_usage_ratio", "jitney_batch_size_sum",
           "jitney_batch_size_count", "jitney_preemptions_total")


def new_client() -> aiohttp.ClientSession:
    """The replay's HTTP client (call it inside the running loop). aiohttp, not httpx: the client shares the
    server's cores, and per streamed chunk httpx's pure-Python stack cost about 160 us of CPU, twice what aiohttp
    with its C parser does, which took 4-5 % of a 2-core machine from the engine in the 128-stream burst
    (docs/benchmarks.md, the Xeon with AMX's "over HTTP" row). No pool limit and no read timeout: a request
    waiting minutes in the server's queue is data, not a failure."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), read_bufsize=1 << 20,  # a line's limit
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30.0))


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


async def _stream(client: aiohttp.ClientSession, url: str, body: dict, rec: RequestRecord, t0: float) -> None:
    start = t0 + rec.submitted_s
    chunk_times: list[float] = []
    async with client.post(f"{url}/v1/completions", json=body) as resp:
        rec.status = resp.status
        if resp.status != 200:
            rec.refused = resp.status == 429
            rec.error = f"HTTP {resp.status}: {_error_message(await resp.read())}"
            return
        async for line in resp.content:  # one line at a time, b"\n" included
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now, event = time.monotonic(), json.loads(line[6:])
            if "error" in event:
                rec.error = event["error"].get("message", "error event")
            if event.get("choices"):
                chunk_times.append(now)
                rec.finish_reason = event["choices"][0].get("finish_reason") or rec.finish_reason
            if event.get("usage"):
                rec.output_tokens = event["usage"]["completion_tokens"]
    if not chunk_times:
        rec.error = rec.error or "stream ended without a token"
        return
    rec.output_tokens = rec.output_tokens or len(chunk_times)
    rec.ttft_ms, rec.total_ms = 1000 * (chunk_times[0] - start), 1000 * (chunk_times[-1] - start)
    rec.inter_token_ms = [1000 * (b - a) for a, b in zip(chunk_times, chunk_times[1:])]
    rec.finished_s = chunk_times[-1] - t0


async def _send(client: aiohttp.ClientSession, url: str, req: TraceRequest, ids: list[int], t0: float,
                model: str | None) -> RequestRecord:
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
    rec = RequestRecord(req.arrival_s, time.monotonic() - t0, len(ids))
    body = {"prompt": ids, "max_tokens": req.output_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    try:
        await _stream(client, url, body, rec, t0)
    except (aiohttp.ClientError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def replay_http(url: str, trace: list[TraceRequest], ids: list[list[int]], progress: bool = True,
                      desc: str = "replay", model: str | None = None, t0: float | None = None,
                      client: aiohttp.ClientSession | None = None) -> list[RequestRecord]:
    """Sends every request at its arrival time (t0: the monotonic time of the trace's zero, default now);
    returns the records in trace order once all have ended."""
    own = client is None
    client = client or new_client()
    try:
        with tqdm(total=len(trace), desc=desc, unit="req", disable=not progress, leave=False) as bar:
            t0 = time.monotonic() if t0 is None else t0
            tasks = [asyncio.create_task(_send(client, url, r, p, t0, model)) for r, p in zip(trace, ids)]
            for task in tasks:
                task.add_done_callback(lambda _: bar.update())
            return list(await asyncio.gather(*tasks))
    finally:
        if own:
            await client.close()


# --- the engine's side, from /metrics ------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, float]:
    """The samples we use from Prometheus text (they have no labels but model_name)."""
    from api.metrics import parse
    return {name: v for (name, labels), v in parse(text, strict=False).items() if name in METRICS and not labels}


class MetricsSampler:
    """Polls GET /metrics every `interval` seconds while a replay runs: the queue, running batch and KV usage
    over time, and the counters' deltas over the run (mean batch size per step, preemptions)."""

    def __init__(self, client: aiohttp.ClientSession, url: str, t0: float, interval: float = 0.5):
        self.client, self.url, self.t0, self.interval = client, url, t0, interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._task: asyncio.Task | None = None

    async def scrape(self) -> None:
        try:
            async with self.client.get(f"{self.url}/metrics") as resp:
                if resp.status == 200:
                    self.samples.append((time.monotonic() - self.t0, parse_metrics(await resp.text())))
        except aiohttp.ClientError:
            pass  # a missed sample is a gap in the plot, not a failed run

    async def _run(self) -> None:
        while True:
            await self.scrape()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> "MetricsSampler":
        await self.scrape()  # the counters' baseline
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        await self.scrape()

    def figures(self) -> tuple[dict, dict[str, list[float]]]:
        """Same keys as report.step_figures: mean batch, KV usage mean/max, preemptions; and the timeline."""
        if len(self.samples) < 2:
            return dict(mean_batch=None, kv_usage_mean=None, kv_usage_max=None, preemptions=None), {}
        first, last = self.samples[0][1], self.samples[-1][1]

        def delta(name: str) -> float | None:
            return last[name] - first[name] if name in first and name in last else None

        steps, batch_sum = delta("jitney_batch_size_count"), delta("jitney_batch_size_sum")
        preempted = delta("jitney_preemptions_total")
        kv = [m["jitney_kv_cache_usage_ratio"] for _, m in self.samples if "jitney_kv_cache_usage_ratio" in m]
        timeline = dict(t=[t for t, _ in self.samples],
                        running=[m.get("jitney_requests_running") for _, m in self.samples],
                        waiting=[m.get("jitney_requests_waiting") for _, m in self.samples],
                        kv_usage=[m.get("jitney_kv_cache_usage_ratio") for _, m in self.samples])
        return dict(mean_batch=batch_sum / steps if steps else None,
                    kv_usage_mean=sum(kv) / len(kv) if kv else None, kv_usage_max=max(kv, default=None),
                    preemptions=None if preempted is None else int(preempted)), timeline
