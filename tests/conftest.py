import os

import pytest

from model_runner.config import RunnerConfig
from model_runner.runner import ModelRunner


def pytest_collection_modifyitems(config, items):
    """make test's second pass on an AVX2 machine (model_runner.native.second_path) runs the portable loop on the
    tiny model and the kernels' own tests, not on the real model."""
    if os.environ.get("JITNEY_TESTS_SKIP_INTEGRATION") == "1":
        skip = pytest.mark.skip(reason="the real model under the second kernel loop: not on this CPU's second pass")
        for item in items:
            if "integration" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_runner() -> ModelRunner:
    """tiny-random in float32 with a small KV cache: fast, and exact enough to compare token for token."""
    return ModelRunner(RunnerConfig(model="tiny-random", dtype="float32", kv_cache_memory=8 << 20), progress=False)


@pytest.fixture(scope="session")
def smol_runner() -> ModelRunner:
    """The real default model (SmolLM2-135M-Instruct) in float32."""
    return ModelRunner(RunnerConfig(model="smollm2-135m", dtype="float32", kv_cache_memory=128 << 20))


@pytest.fixture(scope="session")
def smol_hf(smol_runner):
    """transformers' own Llama on the very same weights: the reference."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smol_runner.model_path, dtype=torch.float32).eval()
