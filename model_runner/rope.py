"""Rotary position embeddings, with the frequency-scaling variants Llama-family configs use.

Each variant only changes the inverse frequencies (and, for YaRN, a magnitude factor); the rotation itself
is the same "rotate half" layout transformers uses, so checkpoints in HF layout need no permutation.
"""
from __future__ import annotations

import math

import torch

from .errors import ModelLoadError


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Returns (inverse frequencies [head_dim/2], attention factor applied to cos/sin)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":  # positions are stretched: equivalent to dividing every frequency
        return inv / factor, 1.0
    if kind == "llama3":  # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth band between
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":  # interpolate low frequencies, extrapolate high ones, ramp between; scale magnitudes
        old_len = scaling.get("original_max_position_embeddings")
        if not old_len:
            raise ModelLoadError("yarn rope scaling needs original_max_position_embeddings in the config")
        beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

        def dim_for(rotations: float) -> float:
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = math.floor(dim_for(beta_fast)), math.ceil(dim_for(beta_slow))
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        ramp = (torch.arange(head_dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)
        extrapolate = 1 - ramp.clamp(0, 1)
        inv = (inv / factor) * (1 - extrapolate) + inv * extrapolate
        attn = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv, float(attn)
    raise ModelLoadError(f"rope scaling {kind!r} is not supported (default, linear, llama3, yarn are)")


class RotaryEmbedding:
    """A cos/sin table for every position up to max_positions, gathered per step by token position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, device):
        inv, attn_factor = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * attn_factor).to(device)
        # rotate_half(x) * sin == roll(x, half) * [-sin, +sin]: the sign lives in the table, so applying the
        # rotation is three operations instead of six (they run 30 times a step, on tiny tensors).
        sin = emb.sin() * attn_factor
        half = head_dim // 2
        self.signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, head_dim] cos and signed-sin tables for the step's tokens, in the compute dtype."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.signed_sin[positions].to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]. Rotates pairs (i, i + head_dim/2) by the position's angle (HF's layout)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
