"""--dtype / --kv-cache-dtype: what auto chooses on each kind of CPU, and a bfloat16 KV cache under float32
compute against a reference that rounds keys and values the same way."""
import pytest
import torch

from model_runner import precision
from model_runner.config import RunnerConfig
from model_runner.errors import ModelLoadError
from model_runner.precision import resolve_precision
from model_runner.runner import ModelRunner

from .reference import PROMPTS, hf_with_bf16_kv, our_greedy, our_logits, relative_error, runner_kv

ZEN4 = {"avx2", "fma", "avx512f", "avx512_bf16"}
ZEN3 = {"avx2", "fma"}


@pytest.mark.parametrize("flags,compute,why", [
    (ZEN4, torch.bfloat16, "AVX-512 with AVX512-BF16"),
    (ZEN3, torch.float32, "AVX2 + FMA without AVX512-BF16"),
    ({"asimd"}, torch.float32, "Arm NEON without BF16"),
])
def test_auto_chooses_by_what_the_cpu_computes_natively(monkeypatch, flags, compute, why):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    p = resolve_precision("auto", "auto", "cpu")
    assert (p.compute, p.kv_cache) == (compute, compute)  # the cache in the compute dtype, as vLLM's auto
    assert why in p.describe() and "compute and KV cache" in p.describe()


def test_a_bfloat16_cache_under_float32_compute_is_asked_for_by_name():
    p = resolve_precision("float32", "bfloat16", "cpu")
    assert (p.compute, p.kv_cache) == (torch.float32, torch.bfloat16)
    assert p.describe().startswith("float32 compute, bfloat16 KV cache")


@pytest.mark.parametrize("dtype,kv", [("bfloat16", "float32"), ("float32", "float16"), ("float32", "int4")])
def test_unsupported_combinations_are_refused_with_what_to_do(dtype, kv):
    with pytest.raises(ModelLoadError, match="KV-cache dtype|KV cache is the compute dtype"):
        resolve_precision(dtype, kv, "cpu")


def test_avx2_switch_makes_an_avx512_machine_choose_as_an_avx2_one(monkeypatch):
    if "avx512_bf16" not in precision.cpu_flags():
        pytest.skip("not an AVX512-BF16 machine")
    monkeypatch.setenv("JITNEY_ISA", "avx2")
    assert not precision.cpu_has_native_bf16()
    assert resolve_precision("auto", "auto", "cpu").compute == torch.float32


@pytest.fixture(scope="module", params=["native", "torch"])
def bf16_kv_runner(request):
    """tiny-random computing in float32 over a bfloat16 KV cache, by the native kernel, then by PyTorch."""
    runner = ModelRunner(RunnerConfig(model="tiny-random", dtype="float32", kv_cache_dtype="bfloat16",
                                      kv_cache_memory=8 << 20), progress=False)
    assert runner.kv_cache.dtype == torch.bfloat16 and runner.dtype == torch.float32
    if request.param == "native" and not runner.native_attention:
        pytest.skip("the native kernels did not build here")
    runner.native_attention = request.param == "native"
    return runner


def test_bf16_kv_logits_match_a_reference_that_rounds_kv_the_same_way(bf16_kv_runner):
    """Against transformers' float32 with keys and values rounded to bfloat16 (the numbers the cache holds).
    Both compute each key and value in float32, in another order: where one lands next to a bfloat16 rounding
    boundary the two round it to neighbouring values, one bfloat16 ulp (2^-8 of it) apart. Those few keys and
    values move the logits by less than one such ulp: a bound of 2^-8 of their range, where leaving the cache
    unrounded (float32) is 2-4x further away from this reference (1e-2 measured on this model)."""
    hf = hf_with_bf16_kv(bf16_kv_runner.model_path)
    ids = bf16_kv_runner.tokenizer("A long enough prompt to cover several KV blocks, " * 6)["input_ids"]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    assert relative_error(our_logits(bf16_kv_runner, ids), ref) < 2.0 ** -8


def test_bf16_kv_greedy_text_is_the_same_alone_and_batched_and_frees_every_block(bf16_kv_runner):
    prompts = [bf16_kv_runner.tokenizer(p)["input_ids"] for p in PROMPTS]
    batched = our_greedy(bf16_kv_runner, prompts, 48)
    assert batched == [our_greedy(bf16_kv_runner, [p], 48)[0] for p in prompts]
    assert runner_kv(bf16_kv_runner).num_free == bf16_kv_runner.num_blocks
