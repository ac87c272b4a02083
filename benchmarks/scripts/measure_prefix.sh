#!/usr/bin/env bash
# Prefix caching, measured: 64 requests sharing a 384-token system prompt (+ 16..64 tokens of their own),
# continuous batching with the prefix cache on, then off (results/prefix-on/, results/prefix-off/). Under a minute on the 2-core development machine (docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p results
for mode in on off; do
  flag=$([ $mode = off ] && echo --no-prefix-caching)
  .venv/bin/jitney bench --in-process --policies continuous --num-requests 64 --rate 4 --dtype bfloat16 \
    --prompt-len 400,448 --output-len 16,64 --shared-prefix 384 $flag --no-progress --out results/prefix-$mode
done
