#!/usr/bin/env bash
# What one request costs the server in CPU: utime + stime of the `jitney serve` process (tiny random model), read
# from /proc before and after a closed-loop wrk run of one-token requests, divided by the requests served; then the
# same per thread (the event loop, the model-step thread, torch's), from /proc/PID/task. Requests/s moves with the
# machine's load; CPU per request moves less, so it is the figure to compare two commits by (run this in each
# checkout in turn, A B A B, nothing else running). Linux only (/proc); needs wrk (apt-get install wrk).
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=${PORT:-8798}; DURATION=${DURATION:-10}; CONNECTIONS=${CONNECTIONS:-32}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
.venv/bin/jitney serve --model tiny-random --port "$PORT" >/tmp/jitney-cpu-server.log 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
run() { wrk -t1 -c"$CONNECTIONS" -d"$1" -s benchmarks/wrk/generate.lua "http://127.0.0.1:$PORT"; }
ticks() {  # "tid name ticks" per thread (a thread that ends meanwhile is skipped), then "all - ticks"
  for t in /proc/$server/task/*; do
    s=$(awk '{print $14 + $15}' "$t/stat" 2>/dev/null) && echo "$(basename "$t") $(tr ' ' _ <"$t/comm") $s"
  done
  echo "all - $(awk '{print $14 + $15}' /proc/$server/stat)"
}
run 3s >/dev/null  # warm-up
before=$(ticks)
out=$(run "${DURATION}s")
after=$(ticks)
n=$(echo "$out" | awk '/requests in/ {print $1}')
echo "$out" | grep -E "requests in|Requests/sec|Non-2xx" || true
join <(echo "$before" | sort) <(echo "$after" | sort) | awk -v n="$n" -v hz="$(getconf CLK_TCK)" -v pid="$server" '
  { us = ($5 - $3) / hz / n * 1e6 }
  $1 == "all" { total = us; next }
  us >= 1 { printf "  thread %s%s: %.0f us/request\n", $1, $1 == pid ? " (main: the event loop)" : "", us }
  END { printf "server CPU per request: %.0f us (%d requests)\n", total, n }'
