"""tiny-random: a small seeded random-init Llama with a byte-level tokenizer, for fast tests.

It is a real model directory (config.json, model.safetensors, tokenizer.json), so it runs through exactly the
same loading and serving code as a real checkpoint, and transformers can load it as a reference.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

TINY_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=1024, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    bos_token_id=1, eos_token_id=0, torch_dtype="float32",
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return llama_weights(config, lambda *shape: torch.randn(*shape, generator=g) * 0.2,
                         lambda d: 1 + 0.1 * torch.randn(d, generator=g))


def llama_weights(config: dict, rand, norm) -> dict[str, torch.Tensor]:
    """A Llama's tensors by Hugging Face name, each matmul weight (and bias) from rand(*shape), each norm weight
    from norm(hidden): the random models here and benchmarks/cuda_check.py's larger ones."""
    d, i, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    h, kvh, v = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    w = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": norm(d)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rand(v, d)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w |= {p + "self_attn.q_proj.weight": rand(h * hd, d), p + "self_attn.k_proj.weight": rand(kvh * hd, d),
              p + "self_attn.v_proj.weight": rand(kvh * hd, d), p + "self_attn.o_proj.weight": rand(d, h * hd),
              p + "mlp.gate_proj.weight": rand(i, d), p + "mlp.up_proj.weight": rand(i, d),
              p + "mlp.down_proj.weight": rand(d, i),
              p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d)}
        if config.get("attention_bias"):  # Qwen2-style q/k/v biases
            w |= {p + "self_attn.q_proj.bias": rand(h * hd), p + "self_attn.k_proj.bias": rand(kvh * hd),
                  p + "self_attn.v_proj.bias": rand(kvh * hd)}
    return w


def byte_level_tokenizer():
    """Bytes as tokens (ids 3..258) after three specials: any text round-trips, no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab |= {ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_random_dir(root: Path, seed: int = 0, **overrides) -> Path:
    """Creates (once) and returns the directory of a tiny random model; overrides change config fields."""
    from safetensors.torch import save_file

    config = TINY_CONFIG | overrides
    tag = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8] if overrides else "base"
    path = root / f"tiny-random-s{seed}-{tag}"
    if (path / "config.json").is_file():
        return path
    # Build beside the target and rename, so a half-written model is never picked up (tests run in parallel).
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(config, seed), str(tmp / "model.safetensors"))
    byte_level_tokenizer().save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path
