"""Model sources -> a Hugging Face-layout directory (config.json, *.safetensors, tokenizer files).

Every source ends as such a directory, so there is one loading path and transformers can load the very same
files as a reference. GGUF files are converted once and cached (keyed by the file's content hash); the
random tiny model is generated once per seed. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import ModelLoadError
from .paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
TINY_RANDOM = "tiny-random"
NAMED_MODELS = (DEFAULT_MODEL, TINY_RANDOM)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def _converted_gguf(path: Path, progress: bool) -> Path:
    from .gguf import convert_gguf
    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {path}")
    out = cache_dir() / f"{path.stem}-{_file_digest(path)}"
    if not (out / "config.json").is_file():
        if progress:
            print(f"converting {path.name} to {out} (once; later starts load the cached copy)", flush=True)
        try:
            convert_gguf(path, out, progress=progress)
        except (OSError, ModelLoadError):
            # Another process (a test's server beside its in-process runner, two servers) converted the same file
            # first: its copy is identical, use it.
            if not (out / "config.json").is_file():
                raise
    return out


def resolve_model(name: str, progress: bool = True) -> Path:
    """The HF-layout directory for a model name or path, creating it (conversion, tiny model) when needed."""
    if name == DEFAULT_MODEL:
        from .gguf import smollm2_gguf_path
        return _converted_gguf(smollm2_gguf_path(), progress)
    if name == TINY_RANDOM:
        from .tiny import tiny_random_dir
        return tiny_random_dir(cache_dir())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return _converted_gguf(path, progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: give a Hugging Face model directory")
        return path
    raise ModelLoadError(f"unknown model {name!r}: use one of {', '.join(NAMED_MODELS)}, a path to a .gguf "
                         f"file, or a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")


def gguf_source(name: str) -> Path | None:
    """The GGUF file a model name stands for, or None (a Hugging Face directory, the tiny random model)."""
    if name == DEFAULT_MODEL:
        from .gguf import smollm2_gguf_path
        return smollm2_gguf_path()
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" else None


def _stored_q4(name: str, converted: Path, progress: bool) -> dict:
    """--quantization q4: the GGUF's Q4_0/Q4_1/Q8_0 matmul weights as stored, repacked for the kernel once and
    cached beside the converted directory's float weights."""
    from . import quant
    source = gguf_source(name)
    if source is None:
        raise ModelLoadError(
            f"--quantization q4 serves the Q4_0/Q4_1/Q8_0 blocks of a GGUF file as stored, and {name} is not a "
            f"GGUF file: use --quantization int8 (any model, quantized at load), or make a Q4_0 GGUF of it with "
            f"llama.cpp (convert_hf_to_gguf.py, then llama-quantize ... Q4_0) and pass the .gguf path")
    cached = converted / "q4_blocks.safetensors"
    if cached.is_file():
        return quant.load(cached)
    from .gguf import stored_blocks
    if progress:
        print(f"repacking the Q4/Q8 blocks of {source.name} for the quantized matmul (once)", flush=True)
    kept, others = stored_blocks(source)
    if not kept:
        raise ModelLoadError(
            f"--quantization q4: {source} holds no Q4_0, Q4_1 or Q8_0 matmul weights (it has "
            f"{', '.join(sorted(set(others.values())))}): use --quantization int8 or none")
    tmp = cached.with_suffix(f".{os.getpid()}.partial")
    quant.save(kept, tmp)
    os.replace(tmp, cached)  # a concurrent writer wrote the same bytes
    return kept


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(p for p in path.glob("*.safetensors") if p.name != "q4_blocks.safetensors")
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not loaded: "
                             f"convert them to safetensors)")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"cannot read {f}: {e}") from e
    return weights


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {e}") from e


def load_model_dir(name: str, progress: bool = True, quantization: str = "none"):
    """(directory, weights by HF name, tokenizer) for a model source. Under --quantization q4 or int8 the matmul
    weights are model_runner.quant.QuantWeight (q4: as the GGUF stores them; int8: quantized here)."""
    from . import quant
    from .config import ModelConfig
    if quantization not in quant.MODES:
        raise ModelLoadError(f"unknown quantization {quantization!r}: choose {', '.join(quant.MODES)}")
    path = resolve_model(name, progress)
    cfg = ModelConfig.from_hf_dir(path)  # first: a wrong architecture is the clearer message
    stored = _stored_q4(name, path, progress) if quantization == "q4" else {}
    weights = load_weights(path)
    weights.update(stored)
    if quantization == "int8":
        weights = quant.quantize_int8(weights)
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight")
               if k not in weights]
    if missing or (not cfg.tie_word_embeddings and "lm_head.weight" not in weights):
        raise ModelLoadError(f"{path} lacks weights this model needs: {missing or ['lm_head.weight']}")
    return path, weights, load_tokenizer(path)
