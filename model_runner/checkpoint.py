"""What a model directory's safetensors files hold, read from their headers and checked against config.json
before a byte of weights is loaded, and what serving the model will take of the host's memory.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range)
and the tensors' bytes. Reading only the headers costs kilobytes whatever the model's size, so a truncated
file, a tensor of the wrong shape, a missing or extra layer, or a model too big for this machine is refused in
one line, before the loader allocates for it (torch would allocate first and fail with a traceback after,
or load a model other than the one config.json describes).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import ModelLoadError

# Float dtypes torch converts to the compute dtype; integer or float8 tensors belong to quantized formats whose
# scales this loader does not read.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
SKIPPED = "q4_blocks.safetensors"  # --quantization q4's cache beside a converted GGUF, not part of the model


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.glob("*.safetensors") if p.name != SKIPPED)
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not loaded: "
                             f"convert them to safetensors)")
    return files


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors one safetensors file declares, each checked to lie inside the file with a float dtype and as
    many bytes as its shape needs."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER_BYTES):
                raise ModelLoadError(f"{file} is not a safetensors file, or is truncated ({size:,} bytes; its "
                                     f"header alone would take {n:,})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"cannot read {file}: {e.strerror or e}") from None
    except (ValueError, RecursionError):  # ValueError: not JSON or not UTF-8
        raise ModelLoadError(f"{file} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} is not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - n
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
            ints = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            ints = False
        if not ints or not isinstance(dtype, str):
            raise ModelLoadError(f"{file} is corrupt: the header's entry for {name!r} is not a dtype, a shape "
                                 f"and a byte range")
        if end > data_bytes:
            raise ModelLoadError(f"{file} is truncated: {name} ends at byte {8 + n + end:,} of a {size:,}-byte "
                                 f"file; copy or download it again")
        if dtype not in DTYPE_BYTES:
            raise ModelLoadError(f"{file} holds {name} as {dtype}; jitney loads float weights "
                                 f"({', '.join(DTYPE_BYTES)}): use the float checkpoint")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ModelLoadError(f"{file} is corrupt: {name} has shape {list(shape)} in {dtype} but "
                                 f"{end - begin:,} bytes")
        tensors[name] = TensorInfo(file, dtype, shape)
    return tensors


def expected_shapes(mc: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the model computes with, by Hugging Face name, with the shape config.json implies."""
    d, i, v = mc.hidden_size, mc.intermediate_size, mc.vocab_size
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not mc.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for n in range(mc.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d),
                   p + "mlp.down_proj.weight": (d, i),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        if mc.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


def _unused(name: str, mc: ModelConfig) -> bool:
    """Tensors checkpoints carry that the model has no use for: older Llama exports' rotary tables (recomputed
    here), and the output matrix of a model that ties it to the embeddings."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and mc.tie_word_embeddings)


def check_weights(path: Path, mc: ModelConfig) -> dict[str, TensorInfo]:
    """The directory's tensors, by name, after checking they are exactly the ones config.json describes."""
    tensors: dict[str, TensorInfo] = {}
    for file in weight_files(path):
        for name, t in read_header(file).items():
            if name in tensors:
                raise ModelLoadError(f"{path} holds {name} twice ({tensors[name].file.name} and {file.name}): "
                                     f"remove the stray file")
            tensors[name] = t
    # Layers first: a config.json that claims a million layers is answered from the file's few, without
    # listing the million's names.
    layers = {int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    numbered = layers == set(range(len(layers)))
    if len(layers) != mc.num_hidden_layers or not numbered:
        raise ModelLoadError(f"{path}: config.json says num_hidden_layers is {mc.num_hidden_layers}, but the "
                             f"weights hold {len(layers)} layers" + ("" if numbered else " (not numbered 0, 1, ...)")
                             + ": config.json and the weights are of different models")
    want = expected_shapes(mc)
    missing = [n for n in want if n not in tensors]
    if missing:
        raise ModelLoadError(f"{path} lacks {len(missing)} of the {len(want)} weights its config.json implies "
                             f"({mc.num_hidden_layers} layers), e.g. {missing[:3]}")
    extra = [n for n in tensors if n not in want and not _unused(n, mc)]
    if extra:
        raise ModelLoadError(f"{path} holds {len(extra)} weights its config.json does not describe "
                             f"({mc.num_hidden_layers} layers), e.g. {extra[:3]}: config.json and the weights "
                             f"are of different models")
    for name, shape in want.items():
        if tensors[name].shape != shape:
            raise ModelLoadError(f"{tensors[name].file}: {name} has shape {list(tensors[name].shape)}, but "
                                 f"config.json implies {list(shape)} (hidden_size {mc.hidden_size}, "
                                 f"intermediate_size {mc.intermediate_size}, vocab_size {mc.vocab_size}, "
                                 f"{mc.num_attention_heads}/{mc.num_key_value_heads} heads of {mc.head_dim})")
    return {n: t for n, t in tensors.items() if n in want}


def host_memory() -> int:
    """Bytes of memory this process can have at most: the machine's RAM, or its cgroup's limit where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


def gib(n: float) -> str:
    """Bytes as a person reads them: GiB, or MiB/KiB for small amounts (a tiny model's weights are not 0.00 GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size or unit == "KiB":
            return f"{n / size:,.2f} {unit}"


@dataclass(frozen=True)
class MemoryPlan:
    """What loading and serving a model takes at the least, from the headers and the flags, in bytes."""
    file_bytes: int    # the weights as stored: loading holds all of them at once
    weight_bytes: int  # the weights as served: parameters x the compute dtype's size (quantized: half a byte)
    weight_note: str
    kv_bytes: int      # the KV cache (0 where it is a fraction of a GPU's free memory)
    rope_bytes: int    # the rotary cos/sin tables, float32, one row per position

    def check(self, path: Path, memory: int) -> None:
        """Refuses a plan that cannot fit `memory` bytes, with the arithmetic."""
        if self.file_bytes > memory:
            raise ModelLoadError(f"{path}: loading its weights takes {gib(self.file_bytes)} (its safetensors "
                                 f"tensors), more than this host's {gib(memory)} of memory: use a smaller model")
        need = self.weight_bytes + self.kv_bytes + self.rope_bytes
        if need > memory:
            terms = [f"weights {gib(self.weight_bytes)} ({self.weight_note})"]
            if self.kv_bytes:
                terms.append(f"KV cache {gib(self.kv_bytes)}")
            terms.append(f"rotary tables {gib(self.rope_bytes)}")
            raise ModelLoadError(
                f"{path}: serving it needs at least {gib(need)} = {' + '.join(terms)}, more than this host's "
                f"{gib(memory)} of memory: use a smaller model, --quantization, a smaller --kv-cache-memory or "
                f"--max-model-len")
