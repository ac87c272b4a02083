"""Model sources -> a Hugging Face-layout directory (config.json, *.safetensors, tokenizer files).

Every source ends as such a directory, so there is one loading path and transformers can load the very same
files as a reference. GGUF files are converted once and cached (keyed by the file's content hash); the
random tiny model is generated once per seed. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import json
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


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(path.glob("*.safetensors"))
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


def load_model_dir(name: str, progress: bool = True):
    """(directory, weights by HF name, tokenizer) for a model source."""
    from .config import ModelConfig
    path = resolve_model(name, progress)
    cfg = ModelConfig.from_hf_dir(path)  # first: a wrong architecture is the clearer message
    weights = load_weights(path)
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight")
               if k not in weights]
    if missing or (not cfg.tie_word_embeddings and "lm_head.weight" not in weights):
        raise ModelLoadError(f"{path} lacks weights this model needs: {missing or ['lm_head.weight']}")
    return path, weights, load_tokenizer(path)
