#!/usr/bin/env bash
# Prefix caching, measured: 64 requests sharing a 384-token system prompt (+ 16..64 tokens of their own),
# continuous batching with the prefix cache on, then off. About 2 minutes on the 2-core development machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p results
for mode in on off; do
  flag=$([ $mode = off ] && echo --no-prefix-caching)
  .venv/bin/python -m benchmarks.engine_bench --policies continuous --num-requests 64 --rate 4 \
    --prompt-len 400,448 --output-len 16,64 --shared-prefix 384 $flag --json results/prefix-$mode.json \
    > results/prefix-$mode.md
done
