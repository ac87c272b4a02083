"""--quantization q4 and int8 through the whole runner and engine: the default model's text is the same alone
and in any batch (through preemption and chunked prefill too), no KV block leaks, and the combinations that
cannot work are refused up front with what to do instead."""
import pytest

from batcher.config import BatcherConfig
from model_runner.config import RunnerConfig
from model_runner.errors import ModelLoadError
from batcher.generate import generate
from model_runner.runner import ModelRunner

from .engine_helpers import greedy, run_requests
from .test_batch_invariance import SYSTEM, TOPICS


@pytest.fixture(scope="module", params=["q4", "int8"])
def quant_runner(request):
    return ModelRunner(RunnerConfig(model="smollm2-135m", dtype="float32", kv_cache_memory=64 << 20,
                                    quantization=request.param), progress=False)


@pytest.mark.integration
async def test_same_text_in_any_batch(quant_runner):
    tok = quant_runner.tokenizer
    prompts = [tok((SYSTEM if i % 2 else "") + f"Tell me about {t}.")["input_ids"] for i, t in enumerate(TOPICS[:8])]
    lengths = [6 + 3 * i for i in range(8)]
    alone = [generate(quant_runner, [p], greedy(n))[0].output_token_ids for p, n in zip(prompts, lengths)]
    for cfg in (BatcherConfig(policy="continuous"), BatcherConfig(policy="continuous", max_num_batched_tokens=7)):
        results, stats = await run_requests(quant_runner, cfg, prompts, [greedy(n) for n in lengths])
        assert [r[0] for r in results] == alone
        assert stats.kv_blocks_used == 0
    # too few blocks for 8 at once: preemption
    results, stats = await run_requests(quant_runner, BatcherConfig(policy="continuous", num_kv_blocks=8), prompts,
                                        [greedy(n) for n in lengths])
    assert stats.kv_blocks_used == 0
    assert stats.preemptions > 0 and [r[0] for r in results] == alone


@pytest.mark.integration
def test_start_up_line_names_the_formats(quant_runner):
    line = quant_runner.describe()
    assert ("q4_1" in line and "q8_0" in line) if quant_runner.cfg.quantization == "q4" else "int8" in line
    assert "quantized matmul by the" in line


def test_int8_tiny_model_generates(tiny_runner):
    """int8 on a float safetensors directory (tiny-random): quantized at load, the same first greedy tokens as
    float32 on this model (its logits are far apart: random weights)."""
    q = ModelRunner(RunnerConfig(model="tiny-random", dtype="float32", kv_cache_memory=8 << 20,
                                 quantization="int8"), progress=False)
    prompt = list(range(3, 40))
    ref = generate(tiny_runner, [prompt], greedy(4))[0].output_token_ids
    assert generate(q, [prompt], greedy(4))[0].output_token_ids[:1] == ref[:1]


@pytest.mark.parametrize("cfg,match", [
    (dict(model="tiny-random", quantization="q4"), "not a GGUF file: use --quantization int8"),
    (dict(model="tiny-random", quantization="int4"), "unknown quantization"),
    (dict(model="tiny-random", quantization="int8", device="cuda"), "CPU|no CUDA"),
])
def test_bad_combinations_refused(cfg, match):
    with pytest.raises(ModelLoadError, match=match):
        ModelRunner(RunnerConfig(kv_cache_memory=8 << 20, **cfg), progress=False)


def test_cli_help_says_what_each_costs():
    from api.cli import build_parser
    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--quantization {none,int8,q4}" in text and "Q4_0/Q4_1/Q8_0" in text


@pytest.mark.integration
@pytest.mark.first_pass_only  # repacks and reads bytes: no kernel runs
def test_q4_repack_from_a_cold_cache(tmp_path):
    """The repack runs once into an empty cache (the path a fresh machine takes) and the cached file gives back
    the same blocks, byte for byte."""
    import torch
    from model_runner.loader import _stored_q4
    first = _stored_q4("smollm2-135m", tmp_path, progress=False)
    assert (tmp_path / "q4_blocks.safetensors").is_file() and not list(tmp_path.glob("*.partial"))
    again = _stored_q4("smollm2-135m", tmp_path, progress=False)
    assert first.keys() == again.keys()
    for name, w in first.items():
        v = again[name]
        assert (w.fmt, w.n, w.k) == (v.fmt, v.n, v.k), name
        for part in ("qs", "d", "m", "row_scale"):
            a, b = getattr(w, part), getattr(v, part)
            assert (a is None and b is None) or torch.equal(a, b), (name, part)
