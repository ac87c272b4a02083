"""How many tokens one model step holds when the operator does not say (`--max-num-batched-tokens auto`).

The budget trades two waits. A step holding more prompt tokens lets waiting prompts in sooner, so the batch of
running streams fills faster and each step's weight read serves more of them; but every running stream waits
for that longer step before its next token. Where a prompt token costs little beside a decode step's fixed
cost, a larger budget wins more than it costs; where prompt tokens are dear, it stretches the streams' tail.

On an Intel Xeon with AMX the bfloat16 matmuls run on the tile units, about 7x float32's rate, so a prompt token
is cheap. There, measured in-process on the issue #20 burst (128 requests at once, prompts 32..512, outputs
16..256; `jitney bench --trace results/peers-amx/burst128.jsonl --policies continuous --sweep
max_num_batched_tokens=512,2048`, twice), 2048 against 512: 496 / 510 against 430 / 425 output tok/s, TTFT p50
4.7-4.9 against 7.1-7.7 s, ITL p90 151 against 233-244 ms, ITL p99 531-552 against 268-273 ms (a decode waiting
behind a full prompt step); at 2 req/s no worse on any column (TTFT p50 158 against 179 ms). vLLM's CPU server
defaults to 2048 too. Elsewhere 512 stays: with the same AVX-512 loops and the tiles left out (a Zen 4's,
JITNEY_ISA=avx512 with oneDNN held to AVX512_CORE_BF16) 2048 gained 6 % on the burst and took ITL p99 from
0.87 to 2.87 s; on a real AMD Zen 3 it made TTFT p50 at 2 req/s worse; q4 on this Xeon gained 2 % for 3.5x the
ITL p99 (docs/benchmarks.md#the-step-budget-follows-the-cpu-2026-12-05). On a GPU it has not been measured.
q4 with its dense path's weights kept (`--quant-dense-rows auto --quant-dense-weights resident`), whose prompt
steps are the bfloat16 model's, takes 2048 too: 513 / 502 output tok/s on the burst against 452 / 472 at 512
(bfloat16 at 2048 beside them: 503 / 491), TTFT p50 4.2-5.0 against 7.1-7.5 s (2026-12-05, A B A B).
"""
from __future__ import annotations

import torch

from .precision import cpu_flags

DEFAULT = 512        # what BatcherConfig holds when the engine has no runner to ask
CHEAP_PROMPTS = 2048  # bfloat16 on the AMX tile units (measured above)


def default_max_num_batched_tokens(device: str, dtype: torch.dtype, quantization: str,
                                   dense_resident: bool = False) -> tuple[int, str]:
    """The step budget `auto` picks for a runner on this device, computing in dtype, and why, in a few words.
    dense_resident: a quantized model keeps its dense path's bfloat16 weights (--quant-dense-weights resident),
    so its prompt steps run the unquantized model's matmuls."""
    if device != "cpu":
        return DEFAULT, f"auto: {CHEAP_PROMPTS} is not measured on {device}"
    if "amx_bf16" not in cpu_flags():
        return DEFAULT, "auto: no AMX tile units"
    if dtype != torch.bfloat16 or (quantization != "none" and not dense_resident):
        return DEFAULT, "auto: only bfloat16 weights (unquantized, or a quantized model's kept dense ones) run on " \
                        "the AMX tile units"
    if quantization != "none":
        return CHEAP_PROMPTS, "auto: prompt steps multiply the kept bfloat16 weights on the AMX tile units"
    return CHEAP_PROMPTS, "auto: bfloat16 matmuls on the AMX tile units make prompt tokens cheap"
