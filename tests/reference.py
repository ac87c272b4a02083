"""Helpers comparing our runner with transformers on the same model directory."""
import torch

import weakref

from batcher.generate import generate, kv_manager, score
from model_runner.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "Photosynthesis is the process by which",
    "<html><body><h1>",
    "Q: What is the boiling point of water?\nA:",
    "Les feuilles mortes se ramassent à la pelle,",
]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def hf_greedy(hf, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of exactly n tokens (EOS does not stop it, nor is it masked)."""
    hf.generation_config.eos_token_id = None  # a None passed to generate() is filled back from here
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


_kv_of = weakref.WeakKeyDictionary()


def runner_kv(runner):
    """One KV-cache manager per runner for the tests' one-shot batches, so a leak shows across calls."""
    if runner not in _kv_of:
        _kv_of[runner] = kv_manager(runner)
    return _kv_of[runner]


def our_greedy(runner, prompts_ids: list[list[int]], n: int) -> list[list[int]]:
    """Ours, run together as one batch, n tokens each."""
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    return [s.output_token_ids for s in generate(runner, prompts_ids, params, kv=runner_kv(runner))]


def our_logits(runner, token_ids: list[int]) -> torch.Tensor:
    """Our logits at every position of token_ids."""
    return score(runner, token_ids, runner_kv(runner))


def hf_with_bf16_kv(path):
    """transformers' Llama in float32 whose attention rounds keys and values to bfloat16 first: the math of a
    float32 runner over a bfloat16 KV cache, so the two agree to float32 rounding."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def bf16_kv_attention(module, query, key, value, *args, **kwargs):
        return sdpa_attention_forward(module, query, key.bfloat16().float(), value.bfloat16().float(), *args, **kwargs)

    AttentionInterface.register("jitney_bf16_kv", bf16_kv_attention)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="jitney_bf16_kv").eval()
