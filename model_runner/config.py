"""Configuration: what the checkpoint says (ModelConfig) and how we run it (RunnerConfig)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

# Architectures whose weights and math this runner implements (same block: RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 puts a bias on q/k/v
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_dir(cls, path: Path) -> "ModelConfig":
        try:
            d = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
        arch = (d.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"{path} holds a {arch} model; jitney runs Llama-family models "
                                 f"({', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        # transformers >= 5 writes rope settings under rope_parameters; older configs use rope_theta/rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = rope or d.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        eos = d.get("eos_token_id")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", arch == "Qwen2ForCausalLM"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        )

    @property
    def kv_bytes_per_token_per_element(self) -> int:
        """K and V elements one token occupies across all layers (multiply by the dtype's size)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


@dataclass
class RunnerConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"          # auto | float32 | bfloat16 | float16
    kv_cache_dtype: str = "auto"  # auto (the compute dtype) | float32 | bfloat16 (also under float32 compute)
    quantization: str = "none"   # none | int8 (per-row int8 at load) | q4 (a GGUF's Q4_0/Q4_1/Q8_0 as stored)
    device: str = "cpu"          # cpu | cuda
    block_size: int = 16         # tokens per KV block
    kv_cache_memory: int | None = None  # bytes for the KV cache; None -> default budget (CPU) or a fraction (CUDA)
    memory_utilization: float = 0.85    # CUDA: fraction of free memory the KV cache may take
    max_model_len: int | None = None    # cap on prompt + output tokens; None -> the model's context window
    seed: int = 0
