"""Replicas and routing on the shared-prefix workload, over HTTP, in one run (`jitney bench routing`).

Configurations, on the same cores and the same total KV-cache memory:
  1x2       one process (no Ray), 2 threads, --kv-cache-memory = 2 x the per-replica budget
  2x1 rr    2 replicas x 1 thread, round-robin
  2x1 p2c   2 replicas x 1 thread, power of two choices
  2x1 prefix  2 replicas x 1 thread, prefix-aware routing
Each gets a fresh server, a few warm-up requests (their own prompts, not the workload's), then the same
open-loop replay (benchmarks.shared_prefix). Reported: output tok/s, the prefix-cache hit rate (the servers'
own block counts, over the whole run), TTFT p50/p99 and end-to-end p99 as the client saw them.

    python -m benchmarks.routing --out /tmp/routing --plot docs/figures/routing.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from model_runner.loader import DEFAULT_MODEL, model_tokenizer

from .http_replay import replay_http
from .machine import cpu_model
from .report import summarize, wall_seconds
from .shared_prefix import SharedPrefixWorkload
from .targets import stop_server
from .trace import TraceRequest, synth_prompt_ids

CONFIGS = {  # label -> extra serve flags (the KV budget is added per configuration)
    "1x2 (one process)": [],
    "2x1 round-robin": ["--replicas", "2", "--cpus-per-replica", "1", "--routing", "round-robin"],
    "2x1 p2c": ["--replicas", "2", "--cpus-per-replica", "1", "--routing", "p2c"],
    "2x1 prefix": ["--replicas", "2", "--cpus-per-replica", "1", "--routing", "prefix"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, flags: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "jitney.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-queue", "100000", "--grace-s", "1", *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"jitney serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{url} was not healthy within 600 s")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    from api.metrics import parse
    return parse(httpx.get(f"{url}/metrics", timeout=30).text)


def run_one(label: str, flags: list[str], args, trace, ids, warm, out: Path) -> dict:
    proc, url = start_server(args.model, flags, out / f"{label.split()[0]}-{label.split()[-1]}.log")
    try:
        asyncio.run(replay_http(url, warm[0], warm[1], progress=False))  # kernels, allocator, Ray paths: warm
        records = asyncio.run(replay_http(url, trace, ids, desc=label))
        time.sleep(2.5)  # replicas report every second: let the last counts arrive
        m = scrape(url)
    finally:
        stop_server(proc, 120)
    s = summarize(records, wall_seconds(records))
    queries = m.get(("jitney_prefix_cache_queries_total", ()))
    s["prefix_hit_rate"] = m.get(("jitney_prefix_cache_hits_total", ()), 0) / queries if queries else None
    s["routing"] = {dict(k[1])["decision"]: v for k, v in m.items() if k[0] == "jitney_routing_decisions_total"}
    return s


def table(results: dict[str, dict]) -> str:
    rows = ["| configuration | output tok/s | prefix hit rate | TTFT p50 | TTFT p99 | e2e p99 | completed |",
            "|---|---|---|---|---|---|---|"]
    for label, s in results.items():
        hit = s["prefix_hit_rate"]
        rows.append(f"| {label} | {s['output_tok_s']:.1f} | {'-' if hit is None else f'{100 * hit:.1f}%'} | "
                    f"{s['ttft_ms']['p50']:.0f} ms | {s['ttft_ms']['p99']:.0f} ms | {s['e2e_ms']['p99']:.0f} ms | "
                    f"{s['completed']}/{s['requests']} |")
    return "\n".join(rows)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    series = (("TTFT p50 (ms)", lambda s: s["ttft_ms"]["p50"]), ("TTFT p99 (ms)", lambda s: s["ttft_ms"]["p99"]),
              ("prefix-cache hit rate (%)", lambda s: 100 * (s["prefix_hit_rate"] or 0)))
    for ax, (name, get) in zip(axes, series):
        ax.bar(range(len(labels)), [get(results[k]) for k in labels], color=["#777", "#c66", "#69c", "#4a4"])
        ax.set_xticks(range(len(labels)), [k.replace(" ", "\n", 1) for k in labels], fontsize=8)
        ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jitney bench routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--requests", type=int, default=SharedPrefixWorkload.num_requests)
    p.add_argument("--rate", type=float, default=SharedPrefixWorkload.rate, help="requests/s, Poisson")
    p.add_argument("--tenants", type=int, default=SharedPrefixWorkload.tenants)
    p.add_argument("--system-tokens", type=int, default=SharedPrefixWorkload.system_tokens)
    p.add_argument("--question-tokens", type=int, default=SharedPrefixWorkload.question_tokens)
    p.add_argument("--output-tokens", type=int, default=SharedPrefixWorkload.output_tokens)
    p.add_argument("--kv-per-replica", default="64MiB",
                   help="KV-cache memory of each replica; the one process gets twice this (default: 64MiB)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated labels from: " + ", ".join(CONFIGS))
    p.add_argument("--out", default="/tmp/jitney-routing", help="results.json, report.md and server logs")
    p.add_argument("--plot", default=None, help="also write the figure here (PNG)")
    args = p.parse_args(argv)
    from model_runner.units import parse_bytes
    kv = parse_bytes(args.kv_per_replica)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = SharedPrefixWorkload(args.requests, args.rate, args.tenants, args.system_tokens, args.question_tokens,
                                args.output_tokens)
    tokenizer = model_tokenizer(args.model)
    trace, ids, _ = work.build(tokenizer)
    warm = ([TraceRequest(0.1 * i, 40, 8) for i in range(4)],
            [synth_prompt_ids(tokenizer, 40, f"warm:{i}") for i in range(4)])
    results = {}
    for label in args.configs.split(","):
        flags = CONFIGS[label] + ["--kv-cache-memory", str(kv if CONFIGS[label] else 2 * kv)]
        results[label] = run_one(label, flags, args, trace, ids, warm, out)
        print(label, json.dumps({k: results[label][k] for k in ("output_tok_s", "prefix_hit_rate", "ttft_ms",
                                                                 "e2e_ms", "routing")}), flush=True)
    desc = (f"{args.model}; {work.num_requests} requests, Poisson {work.rate:g}/s, {work.tenants} tenants x "
            f"{work.system_tokens}-token system prompt + {work.question_tokens}-token question, "
            f"{work.output_tokens} output tokens; KV {args.kv_per_replica}/replica; {cpu_model()}")
    report = f"{desc}\n\n{table(results)}\n"
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"workload": desc, "results": results}, indent=1))
    if args.plot:
        plot(results, Path(args.plot), desc)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
