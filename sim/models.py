"""What a simulation models: the model's shape, the step-cost model and the KV blocks it gets, from a hardware
sheet (a named device, tp of them) or from a calibration of this host (a JSON file `--calibrate` wrote)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.memory_plan import Settings, kv_bytes_per_seq, kv_room, shape_from_config
from model_runner.config import ModelConfig

from .cost import (WEIGHT_BYTES, RooflineCost, RooflineParams, SpreadCost, StepPlan, Work, kv_element_bytes,
                   spread_cell)
from .hardware import ALLREDUCE_LATENCY_S, COMPUTE_EFFICIENCY, LINK_EFFICIENCY, MEMORY_EFFICIENCY, device

# The story's model (docs/README.md): GPT-J-6B's attention (28 layers, 16 heads x 256, no GQA, a 50,400-token
# vocabulary, 2,048 positions) with a Llama MLP (gate, up, down) sized to GPT-J's 6.05B parameters.
STORY_6B = ModelConfig(vocab_size=50400, hidden_size=4096, intermediate_size=10944, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-5,
                       rope_theta=10000.0, rope_scaling=None, max_position_embeddings=2048,
                       tie_word_embeddings=False, attention_bias=False, eos_token_ids=(50256,))
SHAPES = {"story-6b": STORY_6B}
CALIBRATION_KIND = "jitney-simulate-calibration"


def model_config(name: str) -> ModelConfig:
    """A named shape, a Hugging Face config.json (or its folder), or a model jitney serves (its config)."""
    if name in SHAPES:
        return SHAPES[name]
    path = Path(name)
    if path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return ModelConfig.from_hf_dir(path)
    from model_runner.loader import resolve_model  # jitney's named models (brings torch)
    return ModelConfig.from_hf_dir(resolve_model(name, progress=False))


def sheet_model(mc: ModelConfig, model: str, device_name: str, dtype: str, weights: str, kv_dtype: str, tp: int,
                block_size: int, kv_cache_memory: int | None, step_s: float, seq_s: float,
                compute_eff: float = COMPUTE_EFFICIENCY, memory_eff: float = MEMORY_EFFICIENCY
                ) -> tuple[RooflineCost, int]:
    """The cost model and KV blocks of tp x device_name: peaks x efficiencies; the KV room the memory planner
    leaves on each device once weights, overhead and headroom are in (or kv_cache_memory per device)."""
    dev = device(device_name)
    peak = dev.peak_flops(dtype)
    params = RooflineParams(peak * compute_eff, dev.bandwidth * memory_eff, step_s, seq_s, dev.link * LINK_EFFICIENCY,
                            ALLREDUCE_LATENCY_S)
    shape = shape_from_config(model, mc)
    plan = Settings(device_gb=dev.memory_gb, dtype_bytes=WEIGHT_BYTES[weights],
                    kv_dtype_bytes=kv_element_bytes(kv_dtype, mc.head_dim),
                    block_size=block_size, cards=tp)
    room = kv_cache_memory if kv_cache_memory is not None else kv_room(shape, plan)
    blocks = math.floor(room / kv_bytes_per_seq(shape, plan, block_size))
    if blocks < 1:
        raise ValueError(f"{model} with {weights} weights leaves no room for a KV cache on "
                         f"{'one' if tp == 1 else tp} {dev.name} ({dev.memory_gb:g} GB): raise --tp or use "
                         "--weights int8/int4 (python -m benchmarks.memory_plan shows the arithmetic)")
    where = dev.name if tp == 1 else f"{tp} x {dev.name} (tensor parallel, {dev.link_name})"
    desc = (f"{model} on {where}: {dtype} compute, {weights} weights, {kv_dtype} KV cache; roofline at "
            f"{compute_eff:.0%} of {peak / 1e12:,.1f} TFLOP/s and {memory_eff:.0%} of {dev.bandwidth / 1e9:,.0f} GB/s "
            f"(assumed efficiencies), + {step_s * 1e3:g} ms per step + {seq_s * 1e6:g} us per sequence; "
            f"{blocks:,} KV blocks x {block_size} tokens per device; peaks from the {dev.source}")
    return RooflineCost(Work(mc, weights, kv_dtype, tp, dtype), params, peak, dev.bandwidth, desc), blocks


def load_calibration(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the calibration {path}: {e}; write one with jitney simulate --calibrate") from None
    if not isinstance(data, dict) or data.get("kind") != CALIBRATION_KIND:
        raise ValueError(f"{path} is not a calibration written by jitney simulate --calibrate")
    return data


def calibrated_model(cal: dict, mc: ModelConfig, model: str, weights: str, kv_dtype: str, block_size: int,
                     kv_cache_memory: int | None, spread_seed: int | str | None = None) -> tuple[RooflineCost, int]:
    """The host's fitted rates and terms; the KV budget the CPU runner would get (kv_cache_memory or 2 GiB).
    With spread_seed, an in-situ calibration's steps spread as measured (SpreadCost, seeded)."""
    from model_runner.kv_cache import DEFAULT_CPU_KV_BYTES
    params = RooflineParams(**cal["params"])
    per_block = round(mc.kv_bytes_per_token_per_element * kv_element_bytes(kv_dtype, mc.head_dim) * block_size)
    blocks = max(1, (kv_cache_memory or DEFAULT_CPU_KV_BYTES) // per_block)
    how = "in situ" if cal.get("method") == "in-situ" else "on isolated steps"  # files before in situ: the grid
    desc = (f"{model} on this host as calibrated {how} ({cal['host']}, {cal['model']} in {cal['dtype']}, "
            f"{cal['created']}): {weights} weights, {kv_dtype} KV cache; fitted {params.flops_per_s / 1e9:,.1f} "
            f"GFLOP/s, {params.bytes_per_s / 1e9:,.1f} GB/s, {params.step_s * 1e3:.2f} ms per step, "
            f"{params.seq_s * 1e6:.1f} us per sequence"
            + (f", attention at {1 / (1 / params.flops_per_s + params.attention_s_per_flop) / 1e9:,.1f} GFLOP/s"
               if params.attention_s_per_flop else "") + f"; {blocks:,} KV blocks x {block_size} tokens")
    cost = RooflineCost(Work(mc, weights, kv_dtype), params, params.flops_per_s, params.bytes_per_s, desc)
    if spread_seed is not None and (ratios := step_ratios(cal)):
        cost = SpreadCost(cost, ratios, spread_seed)
    return cost, blocks


def step_ratios(cal: dict) -> dict[tuple[str, int, int], list[float]]:
    """An in-situ calibration's measured / modelled step times by spread_cell, its outliers left out; {} for a
    grid calibration (each of its steps is the best of repeats, not a step as served)."""
    if cal.get("method") != "in-situ":
        return {}
    out: dict[tuple[str, int, int], list[float]] = {}
    for s in cal.get("samples", []):
        if not s.get("outlier") and s.get("modelled_seconds"):
            out.setdefault(spread_cell(StepPlan.from_dict(s["plan"])), []).append(s["seconds"] / s["modelled_seconds"])
    return out
