"""Which dtypes a runner computes and caches in, and why: `--dtype auto` and `--kv-cache-dtype auto`.

A CPU with AVX512-BF16 (AMD Zen 4/5, Intel Xeon since Cooper Lake) multiplies bfloat16 natively: half the
bytes of float32 for the same matmul, so everything is bfloat16. Elsewhere (AVX2 machines such as Zen 2/3
and Intel client chips, or Arm) oneDNN has no bf16 matmul, or emulates it slower than float32, so compute
stays float32. The KV cache can still be bfloat16 there (`--kv-cache-dtype bfloat16`), because widening a
bf16 to a float32 is a 16-bit shift the attention kernel does as it reads: a decode step at long contexts is
bound by reading the cache, and that halves its largest stream of bytes. It is not the default: rounding every
key and value to 8 significant bits moves SmolLM2's logits by 0.2-0.6 % of their range (float32 cache: 3e-6),
and greedy text then parts from transformers' float32 on one of the eight reference prompts (at token 38 of
48; tests/test_precision.py checks the kernel against a reference that rounds the same way). So `auto` keeps
the cache in the compute dtype, as vLLM's `--kv-cache-dtype auto` does.

`--kv-cache-dtype int8` stores each key and value row as int8 with a float32 scale of its own (per token, kv
head, K or V: model_runner/kv_cache.py), under float32 or bfloat16 compute: 68 bytes a row at head_dim 64
where bfloat16 takes 128, so a decode step reads about half the KV bytes of a bfloat16 cache (a quarter of a
float32 one). Rows are quantized as they are written and widened back to float32 inside the attention kernels;
what it costs in perplexity and greedy agreement is measured in docs/quantization.md. It is never the default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch

from .errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {**DTYPES, "int8": torch.int8}  # what --kv-cache-dtype accepts besides auto


@cache
def cpuinfo_flags() -> frozenset[str]:
    """This CPU's instruction-set flags as /proc/cpuinfo lists them (x86 "flags", Arm "Features"), empty where
    it is absent: read once, the one place that reads them (native.py keys and picks its builds by them too)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


# JITNEY_ISA values (native.py) that have a CPU stand in for a lesser one, and the flags its description then
# leaves out, so that it chooses as that CPU would: avx2 an AVX-512 machine for an AVX2 one (with
# ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 for PyTorch), avx512 an AMX Xeon for a Zen 4 (with
# ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 for oneDNN).
LEFT_OUT = {"avx2": ("avx512", "amx"), "avx512": ("amx",)}


def emulated() -> str | None:
    """The JITNEY_ISA in LEFT_OUT this CPU runs under, where the CPU has flags it leaves out (the start-up line
    and benchmark tables say so); None otherwise."""
    isa = os.environ.get("JITNEY_ISA", "").lower()
    return isa if any(f.startswith(LEFT_OUT.get(isa, ())) for f in cpuinfo_flags()) else None


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (x86 "flags", Arm "Features"), empty where /proc/cpuinfo is absent; under
    a JITNEY_ISA in LEFT_OUT, without the flags it leaves out."""
    flags = set(cpuinfo_flags())
    isa = emulated()
    return {f for f in flags if not f.startswith(LEFT_OUT[isa])} if isa else flags


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_kind() -> str:
    """The CPU's vector instruction set in a few words, for start-up lines and benchmark tables."""
    flags = cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return "AVX-512 with AVX512-BF16" + (" and AMX" if "amx_bf16" in flags else "") + (
            " (AMX left out: JITNEY_ISA=avx512)" if emulated() == "avx512" else "")
    if "avx512f" in flags:
        return "AVX-512 without AVX512-BF16"
    if "avx2" in flags:
        note = " (emulated on an AVX-512 CPU: JITNEY_ISA=avx2)" if emulated() == "avx2" else ""
        return "AVX2" + (" + FMA" if "fma" in flags else "") + " without AVX512-BF16" + note
    if "asimd" in flags:
        return "Arm NEON" + (" with BF16" if "bf16" in flags else " without BF16")
    return "no AVX2"


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as users spell it (--dtype, --kv-cache-dtype, start-up lines, metrics labels): "bfloat16"."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype   # weights, activations, matmuls
    kv_cache: torch.dtype  # what the KV cache stores
    reason: str            # why, in words, for the start-up line

    def describe(self) -> str:
        what = (f"{dtype_name(self.compute)} compute and KV cache" if self.compute == self.kv_cache
                else f"{dtype_name(self.compute)} compute, {dtype_name(self.kv_cache)} KV cache")
        return f"{what}: {self.reason}"


def compute_dtype(name: str, device: str) -> tuple[torch.dtype, str]:
    """The compute dtype for --dtype NAME on this device, and why."""
    if name == "auto":
        if device.startswith("cuda"):
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "this GPU computes bfloat16 natively (--dtype auto)"
            return torch.float16, "this GPU has no bfloat16 (--dtype auto)"
        if cpu_has_native_bf16():
            return torch.bfloat16, f"this CPU has {cpu_kind()} (--dtype auto)"
        return torch.float32, f"this CPU has {cpu_kind()}: no native bf16 matmul (--dtype auto)"
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    if name == "float16" and not device.startswith("cuda"):
        raise ModelLoadError("float16 is for CUDA; on the CPU use bfloat16 or float32")
    return DTYPES[name], f"--dtype {name}"


def resolve_precision(dtype: str, kv_cache_dtype: str, device: str) -> Precision:
    """Compute and KV-cache dtypes for --dtype and --kv-cache-dtype on this device."""
    compute, why = compute_dtype(dtype, device)
    if kv_cache_dtype == "auto":
        return Precision(compute, compute, why)
    if kv_cache_dtype not in KV_DTYPES:
        raise ModelLoadError(f"unknown KV-cache dtype {kv_cache_dtype!r}: choose auto, {', '.join(KV_DTYPES)}")
    kv = KV_DTYPES[kv_cache_dtype]
    if kv == torch.int8 and device != "cpu":
        raise ModelLoadError(f"an int8 KV cache runs on the CPU (its kernels and tests are the CPU's); on {device} "
                             "use --kv-cache-dtype auto")
    if kv == torch.int8 and compute not in (torch.float32, torch.bfloat16):
        raise ModelLoadError(f"an int8 KV cache under {dtype_name(compute)} compute is not "
                             "supported: use --dtype bfloat16 or float32 with --kv-cache-dtype int8")
    if kv != compute and kv != torch.int8 and not (compute == torch.float32 and kv == torch.bfloat16):
        raise ModelLoadError(f"a {kv_cache_dtype} KV cache under {dtype_name(compute)} compute "
                             "is not supported: the KV cache is the compute dtype, bfloat16 under float32, or int8")
    return Precision(compute, kv, f"{why}, --kv-cache-dtype {kv_cache_dtype}")
