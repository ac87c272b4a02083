"""Model sources -> a Hugging Face-layout directory (config.json, *.safetensors, tokenizer files).

Every source ends as such a directory, so there is one loading path and transformers can load the very same
files as a reference. GGUF files are converted once and cached (keyed by the file's content hash); the
random tiny model is generated once per seed. A Hugging Face Hub id (`org/name`, not a path here) is downloaded
once into Hugging Face's cache by hub.py and then loads like any local directory or GGUF file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .checkpoint import DTYPE_BYTES, MemoryPlan, TensorInfo, check_weights, host_memory, weight_files
from .config import ModelConfig, RunnerConfig
from .errors import ModelLoadError
from .paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
TINY_RANDOM = "tiny-random"
NAMED_MODELS = (DEFAULT_MODEL, TINY_RANDOM)
# A tokenizer's vocabulary is in one of these (the fast tokenizers' file, sentencepiece's, or BPE's vocab.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


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
    from . import hub
    if hub.is_hub_id(name):
        source = hub.resolve(name, progress)
        return _converted_gguf(source, progress) if source.suffix == ".gguf" else source
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return _converted_gguf(path, progress)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: give a Hugging Face model directory")
        return path
    takes = (f"use one of {', '.join(NAMED_MODELS)}, a path to a .gguf file, a Hugging Face model directory "
             f"(config.json, *.safetensors, tokenizer.json), or a Hugging Face Hub id (org/name)")
    if path.exists():
        raise ModelLoadError(f"{path} is neither a .gguf file nor a directory: {takes}")
    if os.sep in name or name.startswith(("~", ".")):
        raise ModelLoadError(f"{path} does not exist: {takes}")
    raise ModelLoadError(f"unknown model {name!r} (and no such file or directory): {takes}")


def gguf_source(name: str) -> Path | None:
    """The GGUF file a model name stands for, or None (a Hugging Face directory, the tiny random model)."""
    from . import hub
    if name == DEFAULT_MODEL:
        from .gguf import smollm2_gguf_path
        return smollm2_gguf_path()
    if hub.is_hub_id(name):  # resolved (downloaded) already by resolve_model: hub.py remembers it
        source = hub.resolve(name, progress=False)
        return source if source.suffix == ".gguf" else None
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


def _one_line(e: BaseException) -> str:
    """A library's error as one line: its lines joined, cut to a readable length."""
    line = " ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def load_weights(path: Path, tensors: dict[str, TensorInfo] | None = None) -> dict[str, torch.Tensor]:
    """The weights by HF name: those of `tensors` (check_weights' answer) where given, else every tensor."""
    from safetensors import safe_open
    weights: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    if tensors is None or name in tensors:
                        weights[name] = st.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"cannot read {f}: {_one_line(e)}") from e
    return weights


def load_tokenizer(path: Path, named: bool = False):
    """The directory's tokenizer, built by transformers' own classes: a model's or tokenizer's custom code
    (an auto_map naming a .py file) is never imported, and never asked about (no prompt).

    named: the directory is jitney's own conversion of one of its named models (NAMED_MODELS), whose
    tokenizer_config.json names TokenizersBackend. AutoTokenizer picks that class for them too, but decides
    only after reading config.json through AutoConfig, which imports transformers' Llama configuration module
    and with it torch.distributed.tensor: about a second of every start, for a choice that is known here.
    They are built directly; tests/test_gguf.py checks that AutoTokenizer builds the same tokenizer."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer: it needs {' or '.join(TOKENIZER_FILES)} (with its "
                             f"tokenizer_config.json)")
    try:
        if named:
            from transformers import TokenizersBackend
            return TokenizersBackend.from_pretrained(path, local_files_only=True)
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        if "trust_remote_code" in str(e):  # transformers' refusal to import the auto_map's .py file
            raise ModelLoadError(f"cannot load the tokenizer in {path}: its tokenizer_config.json or config.json "
                                 f"names custom code (auto_map), and jitney never runs a model's own code: give "
                                 f"it a tokenizer.json with a tokenizer_class transformers knows") from None
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {_one_line(e)}") from e


def model_tokenizer(name: str):
    """The tokenizer of a model name or path (resolve_model), alone: for a client that needs no weights."""
    return load_tokenizer(resolve_model(name), named=name in NAMED_MODELS)


def plan_memory(mc: ModelConfig, tensors: dict[str, TensorInfo], cfg: RunnerConfig) -> MemoryPlan:
    """The least memory loading and serving takes, as the runner will allocate it (see MemoryPlan)."""
    from .kv_cache import plan_num_blocks, kv_cache_bytes_per_block
    from .precision import resolve_precision
    file_bytes = sum(t.numel * DTYPE_BYTES[t.dtype] for t in tensors.values())
    if cfg.device != "cpu":  # weights, KV cache and rotary tables live on the device: only loading is host memory
        return MemoryPlan(file_bytes, 0, "", 0, 0)
    precision = resolve_precision(cfg.dtype, cfg.kv_cache_dtype, cfg.device)
    params = sum(t.numel for t in tensors.values())
    if cfg.quantization == "none":
        size = precision.compute.itemsize
        weights, note = params * size, f"{params:,} parameters x {size} bytes"
    else:  # every quantized format keeps at least 4 bits a parameter (Q4_0: 4.5)
        weights, note = params // 2, f"{params:,} parameters x at least half a byte"
    blocks = plan_num_blocks(mc, cfg.block_size, precision.kv_cache, cfg.device, cfg.kv_cache_memory, 0.0)
    kv = blocks * kv_cache_bytes_per_block(mc, cfg.block_size, precision.kv_cache)
    positions = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    return MemoryPlan(file_bytes, weights, note, kv, 2 * positions * mc.head_dim * 4)


def load_model_dir(name: str, progress: bool = True, quantization: str = "none",
                   runner: RunnerConfig | None = None):
    """(directory, weights by HF name, tokenizer) for a model source. Under --quantization q4 or int8 the matmul
    weights are model_runner.quant.QuantWeight (q4: as the GGUF stores them; int8: quantized here).

    Everything cheap is checked before anything large is read: config.json, the weights' headers against it,
    the memory the runner's settings (`runner`) will take against the host's, the tokenizer."""
    from . import quant
    if quantization not in quant.MODES:
        raise ModelLoadError(f"unknown quantization {quantization!r}: choose {', '.join(quant.MODES)}")
    path = resolve_model(name, progress)
    mc = ModelConfig.from_hf_dir(path)  # first: a wrong architecture is the clearer message
    tensors = check_weights(path, mc)
    plan_memory(mc, tensors, runner or RunnerConfig(model=name, quantization=quantization)).check(path, host_memory())
    tokenizer = load_tokenizer(path, named=name in NAMED_MODELS)
    stored = _stored_q4(name, path, progress) if quantization == "q4" else {}
    weights = load_weights(path, tensors)
    weights.update(stored)
    if quantization == "int8":
        weights = quant.quantize_int8(weights)
    return path, weights, tokenizer
