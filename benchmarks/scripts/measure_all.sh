#!/usr/bin/env bash
# Every figure in README.md and docs/, one run after another (nothing else may run beside it: 2 cores).
# Results go to results/ (not committed); the plots the docs show are copied to docs/figures/.
# Takes about 30 minutes on the 2-core development machine (the sum of the per-command times in
# docs/benchmarks.md); each step prints the time it starts.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=".venv/bin/jitney bench"
R=results
mkdir -p "$R" docs/figures
step() { echo "=== $(date +%T) $*"; }

step micro;      .venv/bin/python -m benchmarks.micro --json $R/micro.json > $R/micro.md
step kernels;    .venv/bin/python -m benchmarks.kernels --json $R/kernels.json > $R/kernels.md
step roofline;   .venv/bin/python -m benchmarks.roofline --model smollm2-135m --dtype bfloat16 \
                   --batch-sizes 1,2,4,8,16,32,64,128,256 --context 128 --steps 16 --prefill-len 512 --out $R/roofline
# The policy comparison: 200 Poisson requests at 16/s, prompts 16..256, outputs 8..256, all four policies.
step readme;     $B --in-process --workload poisson --rate 16 --num-requests 200 --prompt-len 16,256 \
                   --output-len 8,256 --dtype bfloat16 --save-trace $R/readme-trace.jsonl --out $R/readme
# The most output tok/s any schedule of that same trace could reach here, against each policy's measured figure.
step ceiling;    .venv/bin/python -m benchmarks.ceiling --trace $R/readme-trace.jsonl $(.venv/bin/python -c "import json
print(*[f'--compare {r[\"policy\"]}={r[\"summary\"][\"output_tok_s\"]:.0f}' for r in json.load(open('$R/readme/results.json'))['runs']])") \
                   --json $R/ceiling.json > $R/ceiling.md
# vLLM's published workload: 128 requests at once, prompts 32..512, outputs 16..256, forced lengths, greedy.
step burst;      $B --in-process --workload burst --policies continuous --dtype bfloat16 \
                   --save-trace $R/burst.jsonl --out $R/burst
step burst-http; $B --start-server --trace $R/burst.jsonl --policies continuous --dtype bfloat16 --out $R/burst-http
step quick;      /usr/bin/time -f "%e s" $B --quick --out $R/quick 2> $R/quick.time
step azure;      $B --start-server --workload azure --azure-start-s 1200 --azure-duration-s 80 --time-scale 1.4 \
                   --token-scale 8 --dtype bfloat16 --out $R/azure
step sweep-wait; $B --policies dynamic,continuous --workload gamma --gamma-shape 0.25 --rate 4 --num-requests 60 \
                   --prompt-len 16,128 --output-len 16,64 --sweep max_wait_ms=0,5,20,100 --out $R/sweep-max-wait-ms
step sweep-batch; $B --policies static,dynamic --rate 4 --num-requests 60 --prompt-len 16,128 --output-len 16,64 \
                   --sweep max_batch_size=1,4,16,64 --out $R/sweep-max-batch-size
step sweep-tokens; $B --policies continuous --length-dist azure --token-scale 4 --rate 1.5 --num-requests 45 \
                   --sweep max_num_batched_tokens=64,128,256,512,2048 --out $R/sweep-max-num-batched-tokens
step sweep-block; $B --policies continuous --rate 4 --num-requests 60 --prompt-len 16,256 --output-len 16,128 \
                   --kv-cache-memory 64MiB --sweep block_size=8,16,32,64 --out $R/sweep-block-size
step figures  # the plots the docs show
cp $R/roofline/roofline.png docs/figures/roofline.png
cp $R/readme/latency_cdf.png docs/figures/policies_latency_cdf.png
cp $R/readme/timeline.png docs/figures/policies_timeline.png
cp $R/azure/latency_cdf.png docs/figures/azure_latency_cdf.png
cp $R/azure/timeline.png docs/figures/azure_timeline.png
for knob in max-wait-ms max-batch-size max-num-batched-tokens block-size; do
  cp $R/sweep-$knob/sweep.png docs/figures/sweep_${knob//-/_}.png
done
step done
