"""benchmarks.cuda_check, the checks a lent GPU runs, run here on the CPU: its random models, its reference and
batching checks, and its reading of a bench's step timeline (the GPU figures in docs/simulation.md come from
these)."""
import json

import pytest
import torch

from benchmarks import cuda_check
from model_runner.loader import DEFAULT_MODEL, resolve_model

pytestmark = pytest.mark.integration  # SmolLM2's tokenizer, from the converted default model


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory):
    """A two-layer random Llama over SmolLM2's tokenizer, as cuda_check makes its shapes."""
    root = tmp_path_factory.mktemp("models")
    return cuda_check.random_model(root, resolve_model(DEFAULT_MODEL), "tiny", torch.float32, "cpu")


def test_random_model_takes_the_tokenizer_not_the_weights(tiny_smol):
    config = json.loads((tiny_smol / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 49152
    assert {f.name for f in tiny_smol.iterdir()} >= {"model.safetensors", "tokenizer.json", "config.json"}
    assert not (tiny_smol / "q4_blocks.safetensors").exists()
    assert (tiny_smol / "model.safetensors").stat().st_size < 20 << 20  # tiny weights, not SmolLM2's copied


def test_correctness_on_the_cpu(tiny_smol):
    """The figures the GPU reports, here: float32 logits within float32 rounding of transformers' float64 (the
    bound the reference tests use), every greedy text the same alone and batched, every KV block back."""
    out = cuda_check.correctness(tiny_smol, "cpu")
    f32 = out["float32"]
    assert f32["logits_rel_err_vs_float64"] < 1e-4
    assert f32["greedy_same_alone_and_batched"] == f32["prompts"] == len(cuda_check.PROMPTS)
    for figures in out.values():
        assert figures["kv_blocks_free_after"] == figures["kv_blocks"]
    # bfloat16 keeps 8 significant bits: its logits within a few units of 2^-8 of the float64 ones
    assert out["bfloat16"]["logits_rel_err_vs_float64"] < 8 * 2 ** -8


def test_step_medians(tmp_path):
    """Steps while requests wait apart; the rest by batch bucket; each step's time is the gap to the one before."""
    t = [0.0, 0.1, 0.2, 0.21, 0.23, 0.25, 0.28]
    running = [5, 10, 20, 20, 18, 3, 2]
    waiting = [4, 2, 0, 0, 0, 0, 0]
    run = {"policy": "continuous", "timeline": {"t": t, "running": running, "waiting": waiting}}
    (tmp_path / "results.json").write_text(json.dumps({"runs": [run]}))
    got = cuda_check.step_medians(tmp_path / "results.json")["continuous"]
    assert got["steps while requests wait"] == (100.0, 1)  # the step ending at 0.1 (the next one ends the wait)
    assert got["decode b16-31"] == (15.0, 2)                # 10 and 20 ms
    assert got["decode b0-15"] == (25.0, 2)                 # 20 and 30 ms
