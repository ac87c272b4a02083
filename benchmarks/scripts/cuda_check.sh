#!/usr/bin/env bash
# There, on a lent GPU machine (after benchmarks/scripts/cuda_carry.sh here): installs the carried wheels and runs
# benchmarks.cuda_check, its arguments passed on; everything lands in $OUT (check.json whole, the rest as one
# cc.tar.gz, since the device tool brings back at most 8 files). CC_TIMEOUT bounds the checks (default 450 s).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .cudacheck/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${CC_TIMEOUT:-450}" python3 -m benchmarks.cuda_check --out "$OUT/cc" --tokenizer .cudacheck/smollm2 "$@" 2>&1 \
  | grep -v "Loading weights"
cp "$OUT/cc/check.json" "$OUT/" 2>/dev/null
(cd "$OUT" && tar czf cc.tar.gz cc && rm -rf cc)
