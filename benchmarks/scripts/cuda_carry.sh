#!/usr/bin/env bash
# Here, before a lent GPU's run: fills .cudacheck/ (git-ignored) with what benchmarks/scripts/cuda_check.sh needs
# there and the GPU machine's image lacks: SmolLM2's config and tokenizer (not its weights: the checks make
# random models), and wheels of the packages jitney imports that the image does not hold (the image has torch,
# transformers, numpy, httpx, prometheus-client, jinja2, pyyaml, matplotlib, tqdm). Then, with the device tool:
#   run  command="bash benchmarks/scripts/cuda_check.sh"  carry=[".cudacheck"]
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .cudacheck/whl .cudacheck/smollm2
model=$(.venv/bin/python -c "from model_runner.loader import resolve_model; print(resolve_model('smollm2-135m'))")
cp "$model"/config.json "$model"/tokenizer* "$model"/chat_template.jinja .cudacheck/smollm2/
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64; do
  platforms+=(--platform "$p")
done
# The GPU image's Python is 3.12; versions as this venv has them, so both run the same code.
for pkg in llguidance asyncio-throttle starlette uvicorn gguf jsonschema jsonschema-specifications referencing \
           rpds-py; do
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$pkg'))")
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any -d .cudacheck/whl "$pkg==$version"
done
du -sh .cudacheck
