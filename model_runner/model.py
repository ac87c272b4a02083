"""The Llama-family decoder, written for a flat batch: every tensor is [tokens, ...], whatever sequence a
token belongs to. Prefill chunks and decodes share each matmul; only attention looks at sequence boundaries.

Weights come in Hugging Face names; q/k/v and gate/up are fused at load so each layer does three big matmuls
and one small one per step instead of seven.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from .attention import AttentionMetadata, paged_attention, rotate_and_store
from .config import ModelConfig
from .fused import FusedDecoder
from .linear import Linear
from .qmatmul import QuantLinear
from .quant import QuantWeight
from .rope import RotaryEmbedding


def linear(parts: list, bias: torch.Tensor | None, pack: bool,
           dense_rows: int | None = None) -> Linear | QuantLinear:
    """One matmul over weights stacked by rows: float (packed for oneDNN) or quantized (model_runner.qmatmul,
    taking the dense path from dense_rows rows; None: never)."""
    if all(isinstance(p, QuantWeight) for p in parts):
        return QuantLinear(parts, bias, dense_rows)
    if any(isinstance(p, QuantWeight) for p in parts):  # a fused matmul held partly in a GGUF float format
        dtype = next(p.dtype for p in parts if not isinstance(p, QuantWeight))
        parts = [p.dequantize().to(dtype) if isinstance(p, QuantWeight) else p for p in parts]
    return Linear(parts[0] if len(parts) == 1 else torch.cat(parts), bias, pack)


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, w: dict, prefix: str, pack: bool, dense_rows: int | None):
        a, m = prefix + "self_attn.", prefix + "mlp."
        qkv_b = (torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
                 if cfg.attention_bias else None)
        self.qkv = linear([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]], qkv_b, pack,
                          dense_rows)
        self.o = linear([w[a + "o_proj.weight"]], None, pack, dense_rows)
        self.gate_up = linear([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]], None, pack, dense_rows)
        self.down = linear([w[m + "down_proj.weight"]], None, pack, dense_rows)
        self.input_norm = w[prefix + "input_layernorm.weight"]
        self.post_attn_norm = w[prefix + "post_attention_layernorm.weight"]
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim ** -0.5

    def __call__(self, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv_cache: torch.Tensor, meta: AttentionMetadata, next_norm: torch.Tensor,
                 ops: ElementwiseOps) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, h: its input norm. Returns the new stream (x is updated in place) and its
        norm by next_norm (the next layer's input norm, or the final norm), so each add fuses with a norm."""
        t = x.shape[0]
        qkv = self.qkv(h).view(t, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = rotate_and_store(qkv, self.heads, cos, sin, kv_cache, meta)
        attn = paged_attention(q, k, v, kv_cache, meta, self.scale)
        h = ops.add_rms_norm(x, self.o(attn.reshape(t, -1)), self.post_attn_norm, self.eps)
        h = ops.add_rms_norm(x, self.down(ops.silu_mul(self.gate_up(h))), next_norm, self.eps)
        return x, h


class ElementwiseOps:
    """The residual add + RMSNorm and SiLU-and-multiply steps: native kernels on the CPU (one pass each, with
    the roundings of transformers' bfloat16 modules), PyTorch elsewhere."""

    def __init__(self, native_ops: bool):
        self.native = native_ops

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """x += delta (in place) when given; returns RMSNorm(x) * weight."""
        if self.native:
            return native.add_rms_norm(x, delta, weight, eps)
        if delta is not None:
            x += delta
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.native:
            return native.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict, dtype: torch.dtype, device: str, max_positions: int,
                 dense_rows: int | None = None, fused: bool = True):
        """weights: tensors by HF name, the matmul ones possibly quantized (QuantWeight: CPU only; their matmuls
        take the dense path from dense_rows rows, qmatmul.dense_min_rows). fused: where every layer matmul is
        quantized, steps whose kernels allow it run the whole stack in one native call (fused.py); False keeps
        every step on the Python loop (to compare, or to watch each matmul)."""
        pack = device == "cpu"
        w = {k: v if isinstance(v, QuantWeight) else v.to(device=device, dtype=dtype) for k, v in weights.items()}
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.embed = w["model.embed_tokens.weight"]
        self.layers = [DecoderLayer(cfg, w, f"model.layers.{i}.", pack, dense_rows)
                       for i in range(cfg.num_hidden_layers)]
        self.norm = w["model.norm.weight"]
        self.lm_head = linear([self.embed if cfg.tie_word_embeddings else w["lm_head.weight"]], None, pack,
                              dense_rows)
        self.ops = ElementwiseOps(native.elementwise_supported(device, dtype))
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.fused = FusedDecoder.build(self) if fused else None

    def layer_matmuls(self) -> list[Linear | QuantLinear]:
        """Every decoder layer's four matmuls (fused q/k/v, o, fused gate/up, down), layer by layer."""
        return [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    def keep_dense_weights(self) -> int:
        """--quant-dense-weights resident: every quantized matmul keeps its weights dequantized for its dense path
        (QuantLinear.keep_dequantized). Returns the bytes that adds."""
        return sum(m.keep_dequantized(self.dtype) for m in self.layer_matmuls() + [self.lm_head]
                   if isinstance(m, QuantLinear))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]. kv_cache: [layers, 2, kv_heads, blocks, block_size, head_dim]. -> hidden [T, d]"""
        x = (self.embed.dequantize_rows(input_ids).to(self.dtype) if isinstance(self.embed, QuantWeight)
             else self.embed[input_ids])
        cos, sin = self.rope.cos_sin(positions, self.dtype)
        if self.fused is not None and self.fused.runs(meta, x.shape[0]):
            return self.fused(x, cos, sin, kv_cache, meta)
        h = self.ops.add_rms_norm(x, None, self.layers[0].input_norm, self.cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            x, h = layer(x, h, cos, sin, kv_cache[i], meta, next_norm, self.ops)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for these rows (never the whole prompt): for logprobs and comparisons."""
        return self.head(hidden).float()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits in the compute dtype, for the rows a step samples: greedy rows take their
        argmax from them as they are (the native kernel widens bfloat16 as it reads: the float32 cast's index,
        without writing 25 MB of it at batch 128), and whatever needs float32 casts only its own rows."""
        return self.lm_head(hidden)
