"""Configuration: what the checkpoint says (ModelConfig) and how we run it (RunnerConfig)."""
from __future__ import annotations

import json
import math
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

# Architectures whose weights and math this runner implements (same block: RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
# A model's config.json is a few kilobytes; a file far larger is not one, and is refused before it is read.
MAX_CONFIG_BYTES = 1 << 20
_REQUIRED = object()


class _Fields:
    """config.json's values, each read with its type and range checked: the first bad one is refused in one
    line that names the file, the key and what it must be (torch would fail later, deep in a traceback, or
    allocate by it first)."""

    def __init__(self, d: dict, file: Path, prefix: str = ""):
        self.d, self.file, self.prefix = d, file, prefix

    def bad(self, key: str, value: object, must: str) -> ModelLoadError:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return ModelLoadError(f"{self.file}: {self.prefix}{key} is {shown}; it must be {must}")

    def get(self, key: str, default: object):
        """The value, the default where the key is absent or null (as transformers reads it); a required key
        that is absent is refused, one that is null fails its type check."""
        if key not in self.d:
            if default is _REQUIRED:
                raise ModelLoadError(f"{self.file} lacks {self.prefix}{key}, which a Llama-family config.json gives")
            return default
        v = self.d[key]
        return default if v is None and default is not _REQUIRED else v

    def int(self, key: str, default: object = _REQUIRED, low: int = 1) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise self.bad(key, v, f"an integer >= {low}")
        return v

    def number(self, key: str, default: object, above: float) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= above:
            raise self.bad(key, v, f"a finite number > {above:g}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.bad(key, v, "true or false")
        return v


def read_config_json(path: Path) -> dict:
    """config.json as a dict, or a ModelLoadError that says what is wrong with the file."""
    file = path / "config.json"
    try:
        st = file.stat()
        if not stat.S_ISREG(st.st_mode):  # a directory, or a pipe that would block the read forever
            raise ModelLoadError(f"{file} is not a regular file")
        if (size := st.st_size) > MAX_CONFIG_BYTES:
            raise ModelLoadError(f"{file} is {size:,} bytes; a model's config.json is a few kilobytes")
        d = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{file} is not UTF-8 text (byte {e.start}): it is not a config.json") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{file} is not valid JSON ({str(e) or 'nested too deeply'})") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {file}: {e.strerror or e}") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{file} holds a JSON {type(d).__name__}, not an object of model settings")
    return d


def _rope_scaling(f: _Fields, scaling: object) -> dict | None:
    """The rope scaling block, checked for the variants rope.py computes (None for plain RoPE)."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise f.bad("rope_scaling", scaling, "an object or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3", "yarn"):
        raise f.bad("rope_scaling.rope_type", kind, "default, linear, llama3 or yarn (the variants jitney computes)")
    s = _Fields(scaling, f.file, "rope_scaling.")
    s.number("factor", _REQUIRED, 0)
    if kind == "llama3":
        low, high = s.number("low_freq_factor", _REQUIRED, 0), s.number("high_freq_factor", _REQUIRED, 0)
        if high <= low:
            raise s.bad("high_freq_factor", high, f"above low_freq_factor ({low:g})")
        s.int("original_max_position_embeddings")
    if kind == "yarn":
        s.int("original_max_position_embeddings")
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("attention_factor", 1.0)):
            s.number(key, default, 0)
    return scaling


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
        """Reads and checks config.json: every field this runner uses has its type and range checked here,
        before a byte of weights is read (a malformed config is one line, never a traceback deep in torch)."""
        f = _Fields(read_config_json(path), path / "config.json")
        archs = f.get("architectures", _REQUIRED)
        if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
            raise f.bad("architectures", archs, 'a list of class names, e.g. ["LlamaForCausalLM"]')
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"{path} holds a {archs[0]} model; jitney runs Llama-family models "
                                 f"({', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        if (act := f.get("hidden_act", "silu")) != "silu":
            raise f.bad("hidden_act", act, '"silu" (the only activation jitney computes)')
        if f.bool("mlp_bias", False):
            raise f.bad("mlp_bias", True, "false (jitney computes Llama's MLP, which has no biases)")
        if (q := f.get("quantization_config", None)) is not None:
            method = q.get("quant_method", "?") if isinstance(q, dict) else q
            raise ModelLoadError(f"{path} is a {method}-quantized checkpoint: jitney loads float weights "
                                 f"(F32/F16/BF16); use the float checkpoint, with --quantization int8 if wanted")
        vocab, hidden = f.int("vocab_size"), f.int("hidden_size")
        heads = f.int("num_attention_heads")
        kv_heads = f.int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise f.bad("num_key_value_heads", kv_heads,
                        f"a divisor of num_attention_heads ({heads}): each KV head serves a whole group of heads")
        if "head_dim" in f.d and f.d["head_dim"] is not None:
            head_dim = f.int("head_dim")
        elif hidden % heads:
            raise f.bad("num_attention_heads", heads,
                        f"a divisor of hidden_size ({hidden}) when head_dim is not given")
        else:
            head_dim = hidden // heads
        if head_dim % 2:
            raise f.bad("head_dim", head_dim, "even: rotary embeddings turn pairs of dimensions")
        # transformers >= 5 writes rope settings under rope_parameters; older configs use rope_theta/rope_scaling.
        rope = f.get("rope_parameters", {})
        if not isinstance(rope, dict):
            raise f.bad("rope_parameters", rope, "an object or null")
        theta_from = _Fields(rope, f.file, "rope_parameters.") if "rope_theta" in rope else f
        theta = theta_from.number("rope_theta", 10000.0, 1)
        rope = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = _rope_scaling(f, rope or f.get("rope_scaling", None))
        eos = f.get("eos_token_id", [])
        eos = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in eos):
            raise f.bad("eos_token_id", f.d["eos_token_id"],
                        f"a token id or a list of them, each in 0..{vocab - 1} (the vocabulary)")
        return cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=f.int("intermediate_size"),
            num_hidden_layers=f.int("num_hidden_layers"), num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, rms_norm_eps=f.number("rms_norm_eps", 1e-6, 0), rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=f.int("max_position_embeddings", 2048),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            attention_bias=f.bool("attention_bias", archs[0] == "Qwen2ForCausalLM"),
            eos_token_ids=tuple(eos),
        )

    @property
    def kv_bytes_per_token_per_element(self) -> int:
        """K and V elements one token occupies across all layers (multiply by the dtype's size)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


@dataclass
class RunnerConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"          # auto | float32 | bfloat16 | float16
    kv_cache_dtype: str = "auto"  # auto (the compute dtype) | float32 | bfloat16 (also under float32) | int8 (CPU)
    quantization: str = "none"   # none | int8 (per-row int8 at load) | q4 (a GGUF's Q4_0/Q4_1/Q8_0 as stored)
    quant_dense_rows: str = "off"  # off | auto | N: from how many rows a quantized matmul dequantizes (qmatmul.py)
    quant_dense_weights: str = "slices"  # slices (dequantized every dense step) | resident (once, kept: qmatmul.py)
    device: str = "cpu"          # cpu | cuda
    block_size: int = 16         # tokens per KV block
    kv_cache_memory: int | None = None  # bytes for the KV cache; None -> default budget (CPU) or a fraction (CUDA)
    memory_utilization: float = 0.85    # CUDA: fraction of free memory the KV cache may take
    max_model_len: int | None = None    # cap on prompt + output tokens; None -> the model's context window
    seed: int = 0
    threads: int | None = None         # threads per step (model_runner/threads.py); None -> every CPU allowed
