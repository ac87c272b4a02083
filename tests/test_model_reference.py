"""Our model against transformers' own implementation on the same weights (float32)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from model_runner.config import RunnerConfig
from model_runner.paths import cache_dir
from model_runner.runner import ModelRunner
from model_runner.tiny import tiny_random_dir

from .reference import PROMPTS, hf_greedy, our_greedy, our_logits, relative_error, runner_kv

# Each variant exercises a different branch of the model: rope scalings, GQA ratios, biases, tied embeddings.
VARIANTS = {
    "base": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope-llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "rope-yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    "qwen2-bias": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=True,
                       num_key_value_heads=1),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_logits_match_transformers(variant):
    path = tiny_random_dir(cache_dir(), **VARIANTS[variant])
    runner = ModelRunner(RunnerConfig(model=str(path), dtype="float32", kv_cache_memory=4 << 20), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = runner.tokenizer("A long enough prompt to cover several KV blocks, " * 6)["input_ids"]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    assert relative_error(our_logits(runner, ids), ref) < 1e-4


def test_tiny_greedy_matches_transformers_generate(tiny_runner):
    hf = AutoModelForCausalLM.from_pretrained(tiny_runner.model_path, dtype=torch.float32).eval()
    prompts = [tiny_runner.tokenizer(p)["input_ids"] for p in PROMPTS]
    ours = our_greedy(tiny_runner, prompts, 48)
    assert ours == [hf_greedy(hf, p, 48) for p in prompts]
    assert runner_kv(tiny_runner).num_free == tiny_runner.num_blocks


@pytest.mark.integration
def test_smollm2_logits_match_transformers(smol_runner, smol_hf):
    for text in PROMPTS[:4]:
        ids = smol_runner.tokenizer(text)["input_ids"]
        with torch.inference_mode():
            ref = smol_hf(torch.tensor([ids])).logits[0]
        assert relative_error(our_logits(smol_runner, ids), ref) < 1e-4, text


@pytest.mark.integration
# 8 x 16 tokens (48 cost ~40 s a pass, 24 ~15 s). Under the second kernel loop the same path is covered
# by test_smollm2_logits_match_transformers (this model), test_tiny_greedy_matches_transformers_generate (the
# decode path against transformers) and tests/test_batch_invariance.py (this model's greedy text, every policy).
@pytest.mark.first_pass_only
def test_smollm2_greedy_matches_transformers_generate(smol_runner, smol_hf):
    prompts = [smol_runner.tokenizer(p)["input_ids"] for p in PROMPTS]
    ours = our_greedy(smol_runner, prompts, 16)
    for p, text, mine in zip(prompts, PROMPTS, ours):
        assert mine == hf_greedy(smol_hf, p, 16), text
