#!/usr/bin/env bash
# The serving layer's own ceiling: jitney on the tiny random model, one-token requests, driven by wrk
# (apt-get install wrk) from the same machine. Closed loop: 32 connections, each sends its next request as soon
# as the previous one returns. Prints wrk's report and the server's status counts.
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=${PORT:-8799}; DURATION=${DURATION:-15s}; CONNECTIONS=${CONNECTIONS:-32}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
.venv/bin/jitney serve --model tiny-random --port "$PORT" >/tmp/jitney-wrk-server.log 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
wrk -t1 -c"$CONNECTIONS" -d3s -s benchmarks/wrk/generate.lua "http://127.0.0.1:$PORT" >/dev/null  # warm-up
wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s benchmarks/wrk/generate.lua "http://127.0.0.1:$PORT"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^jitney_(http_requests_total|batch_size_(sum|count))'
