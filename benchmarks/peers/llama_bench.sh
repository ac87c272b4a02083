#!/usr/bin/env bash
# llama.cpp's own decode figure for a GGUF on this machine: `llama-bench -p 0 -n 128` (tg128, tokens/s at batch
# 1), the peer figure benchmarks.quantization sets jitney's --quantization q4 beside. llama-bench is built by
# llama_cpp.sh (the same llama-cpp-python sdist, the same scratch directory; an existing build is reused).
#
#   bash benchmarks/peers/llama_bench.sh [native|avx2] [GGUF] [DIR]   (default: native, the default model, /tmp/jitney-peers)
#
# Threads: as many as the CPUs this process may use (what jitney's PyTorch uses too).
set -euo pipefail
ISA=${1:-native}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GGUF=${2:-$(cd "$ROOT" && PYTHONPATH="$ROOT" "${PYTHON:-python3}" -c \
  'from model_runner.gguf import smollm2_gguf_path; print(smollm2_gguf_path())')}
DIR=${3:-/tmp/jitney-peers}
BENCH=$(bash "$ROOT/benchmarks/peers/llama_cpp.sh" "$ISA" "$DIR" | tail -n 1)
echo "# $BENCH -m $GGUF -p 0 -n 128 -t $(nproc) on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($ISA build)"
"$BENCH" -m "$GGUF" -p 0 -n 128 -t "$(nproc)"
