"""The FLOP and byte cost model that micro and roofline share: what one model step must compute and read,
and so the least time this machine's ceilings (benchmarks.machine) allow it."""
from __future__ import annotations

from model_runner.config import ModelConfig

from .machine import Machine


def matmul_params(mc: ModelConfig) -> int:
    """Weights a token multiplies through: q, k, v, o, gate, up, down per layer, and the lm_head."""
    attn = mc.hidden_size * mc.head_dim * 2 * (mc.num_attention_heads + mc.num_key_value_heads)
    mlp = 3 * mc.hidden_size * mc.intermediate_size
    return mc.num_hidden_layers * (attn + mlp) + mc.vocab_size * mc.hidden_size


def decode_step_cost(mc: ModelConfig, batch: int, context_len: float, elem_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step: every weight is read once for the batch, each sequence's KV once."""
    attn_flops = 4 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * context_len  # q.k and p.v
    flops = (2 * matmul_params(mc) + attn_flops) * batch
    kv_bytes = mc.kv_bytes_per_token_per_element * context_len * elem_bytes * batch
    return flops, matmul_params(mc) * elem_bytes + kv_bytes


def prefill_cost(mc: ModelConfig, n: int, elem_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one sequence's n-token prefill: weights read once, each token's K/V written once.

    Every token goes through every layer, but only the last one through the lm_head (only it is sampled), and
    causal attention lets token i see i + 1 keys."""
    lm_head = mc.vocab_size * mc.hidden_size
    attn_flops = 4 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * n * (n + 1) / 2
    flops = 2 * (matmul_params(mc) - lm_head) * n + 2 * lm_head + attn_flops
    return flops, (matmul_params(mc) + mc.kv_bytes_per_token_per_element * n) * elem_bytes


def ridge_point(machine: Machine, dtype: str) -> float:
    """The intensity (FLOP/byte) where the bandwidth slope meets the compute ceiling."""
    return machine.matmul_gflops[dtype] / machine.copy_gbps


def generate_floor_s(mc: ModelConfig, machine: Machine, dtype: str, batch: int, prompt_len: int, gen_len: int,
                     elem_bytes: int) -> float:
    """The least time any engine could take for this generate on this machine: the prompts' FLOPs at the matmul
    ceiling, then each decode step on the roofline (its FLOPs at the ceiling or its weight and KV bytes at the
    copy bandwidth, whichever binds), and nothing else. transformers' time over it bounds the speed-up."""
    lm_head = mc.vocab_size * mc.hidden_size  # run for each prompt's last token only
    seconds = (2 * (matmul_params(mc) - lm_head) * prompt_len + 2 * lm_head) * batch / machine.matmul_gflops[dtype] / 1e9
    for i in range(gen_len - 1):
        flops, nbytes = decode_step_cost(mc, batch, prompt_len + i + 1, elem_bytes)
        seconds += flops / machine.roofline_gflops(dtype, flops / nbytes) / 1e9
    return seconds
