"""--quantization q4 and int8 through the whole runner and engine: the default model's text is the same alone
and in any batch (through preemption and chunked prefill too), no KV block leaks, and the combinations that
cannot work are refused up front with what to do instead."""
import pytest
import torch
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings, strategies as st

from batcher.config import BatcherConfig
from model_runner.config import RunnerConfig
from model_runner.errors import ModelLoadError
from batcher.generate import generate
from model_runner.runner import ModelRunner

from model_runner import qmatmul, quant
from model_runner.loader import load_model_dir
from model_runner.model import LlamaModel

from .engine_helpers import greedy, run_requests
from .onednn import packed_and_plain_differ
from .reference import our_logits, relative_error
from .test_batch_invariance import SYSTEM, TOPICS
from .test_quant import GGUF_TYPES, bound, dense_bound, kernel_isas


@pytest.fixture(scope="module", params=["q4", "int8"])
def quant_runner(request):
    return ModelRunner(RunnerConfig(model="smollm2-135m", dtype="float32", kv_cache_memory=64 << 20,
                                    quantization=request.param), progress=False)


@pytest.mark.integration
# Once, not again on make test's second kernel loop: each loop's batch invariance is tested per format by
# tests/test_quant.py's test_matmul_batch_invariant (every loop, in the first pass) and on this model by
# test_bfloat16_integer_loop_alone_is_batch_invariant below; chunking and preemption run no kernel of their own.
@pytest.mark.first_pass_only
async def test_same_text_in_any_batch(quant_runner):
    tok = quant_runner.tokenizer
    prompts = [tok((SYSTEM if i % 2 else "") + f"Tell me about {t}.")["input_ids"] for i, t in enumerate(TOPICS[:8])]
    lengths = [6 + 2 * i for i in range(8)]
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
    from jitney.cli import build_parser
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


# --- every compute dtype, KV-cache dtype, format and kernel loop against the float model of the same weights ---
# tiny-random's matmul weights quantized to each format (q4's GGUF formats by llama.cpp's own quantizer), served
# beside the float model of exactly the dequantized weights: the quantized matmul is then the only difference.

FORMATS = ["q4_0", "q4_1", "q8_0", "int8"]
# (compute, KV cache): every pair --dtype / --kv-cache-dtype accept on the CPU (float16 is refused there).
PRECISIONS = [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")]
PROMPTS = st.lists(st.integers(3, 319), min_size=1, max_size=70)  # tiny-random's vocabulary, up to 5 KV blocks


@pytest.fixture(scope="module")
def tiny_weights():
    return load_model_dir("tiny-random", progress=False)[1]


def quantized(weights: dict, fmt: str) -> dict:
    def one(w):
        if fmt == "int8":
            return quant.QuantWeight.int8(w)
        return quant.QuantWeight.from_gguf(fmt, torch.from_numpy(quantize(w.float().numpy(), GGUF_TYPES[fmt])),
                                           w.shape[1])
    return {n: one(w) if quant.is_matmul_weight(n) and w.dim() == 2 else w for n, w in weights.items()}


def tiny_with(weights: dict, dtype: str, kv: str) -> ModelRunner:
    """tiny-random's runner serving these weights (quantized or not) at this compute and KV-cache dtype."""
    r = ModelRunner(RunnerConfig(model="tiny-random", dtype=dtype, kv_cache_dtype=kv, kv_cache_memory=4 << 20),
                    progress=False)
    with torch.inference_mode():
        r.model = LlamaModel(r.model_config, weights, r.dtype, "cpu", r.max_model_len)
    return r


@pytest.fixture(scope="module", params=kernel_isas())
def loop(request):
    """Each quantized-matmul loop this CPU can run."""
    from .test_quant import quant_library
    return quant_library(request.param)


@pytest.fixture(scope="module", params=FORMATS)
def pair(request, tiny_weights):
    """(the float model of the dequantized weights, the quantized model), per precision, built once."""
    q = quantized(tiny_weights, request.param)
    dq = {n: w.dequantize() if isinstance(w, quant.QuantWeight) else w for n, w in q.items()}
    return {p: (tiny_with(dq, *p), tiny_with(q, *p)) for p in PRECISIONS}


@pytest.fixture(params=["integer", "dense"])
def path(request, monkeypatch):
    """Each matmul path for every matmul of the model, whatever its rows (the models are built once)."""
    monkeypatch.setattr(qmatmul, "choose_path", lambda m, dense_rows: request.param)
    return request.param


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=PROMPTS)
def test_float32_compute_logits_are_the_float_models_to_bfloat16_precision(monkeypatch, loop, pair, path, ids):
    """Under float32 compute the quantized model's logits are the float model's to better than one bfloat16
    rounding of the logits themselves: the activations' 16-bit quantization (steps of 1/32258 of a block's
    largest value, csrc/qmatmul.cpp) is invisible at the precision the other compute dtype keeps. Measured on
    tiny-random: 1-3e-4 (float32 KV); the 8-bit activations this replaced gave 2-7e-2, several bfloat16
    roundings, and turned greedy answers on the real model. The dense path multiplies the float32 weights
    themselves (float32 sums only). (Over a bfloat16 KV cache the two models' keys and
    values, 2^-15 apart, round to neighbouring bfloat16 values wherever they straddle a rounding boundary: one
    ulp here and there, up to 1e-2 of the logits measured, whatever the kernel; the matmul check below covers
    that precision instead.)"""
    monkeypatch.setattr(quant, "library", lambda: loop)
    ref, q = pair[PRECISIONS[0]]
    assert relative_error(our_logits(q, ids), our_logits(ref, ids)) < 2.0 ** -8  # unit roundoff, 8 bits


@pytest.mark.parametrize("precision", PRECISIONS)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=PROMPTS)
def test_each_matmul_errs_by_no_more_than_its_formats_allow(monkeypatch, loop, pair, precision, path, ids):
    """Under every compute and KV-cache dtype, on each path, each quantized matmul, on the activations the
    model really feeds it, is within its bound of the float64 product with the dequantized weights: the
    integer loop's (tests/test_quant.bound: a bfloat16 output's own rounding, 2^-8 relative, plus the
    activations' 16-bit steps and float32 sums) or the dense path's (tests/test_quant.dense_bound: the compute
    dtype's own, weights rounded to it included). Whole-model bfloat16 logits
    wander from float32's by bfloat16's own rounding noise, quantized or not (2-6 % of the logits' range on
    tiny-random either way), which hides a kernel's error; each matmul's check does not."""
    calls = []
    matmul = qmatmul.matmul

    def checked(parts, x, lib=None, path="integer"):
        taken = path  # what QuantLinear asked for
        y = matmul(parts, x, loop, taken)
        w = torch.cat([p.dequantize() for p in parts])
        limit = (bound if taken == "integer" else dense_bound)(w, x, y.dtype)
        calls.append((y.dtype, taken, ((y.double() - x.double() @ w.double().T).abs() - limit).max()))
        return y

    monkeypatch.setattr(qmatmul, "matmul", checked)
    # Each layer matmul through qmatmul.matmul, to be checked: the Python loop, not the fused call (fused.py),
    # which runs the same kernels and is tested against this loop bit for bit (tests/test_fused.py).
    monkeypatch.setattr(pair[precision][1].model, "fused", None)
    our_logits(pair[precision][1], ids)
    assert calls and all(dtype == getattr(torch, precision[0]) and taken == path for dtype, taken, _ in calls)
    assert max(excess for _, _, excess in calls) <= 0, "a quantized matmul erred past its bound"


# --- the real model: the combinations --dtype auto picks (bfloat16 on AVX512-BF16 CPUs, float32 elsewhere) -----

ANSWERS = ["What is the capital of France?", "What is 2 + 2?", "Name the largest planet in the solar system."]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["q4", "int8"])
def test_bfloat16_compute_answers_as_float32_does(mode):
    """The README's first prompt and two more, as chat, greedy, 12 tokens: the quantized model under bfloat16
    compute answers with the float32-compute quantized model's text, and the first says Paris. (With 8-bit
    activations both dtypes answered "L'Étoile, la Marseillaise, ..." on this CPU.)"""
    texts = {}
    for dtype in ("float32", "bfloat16"):
        r = ModelRunner(RunnerConfig(model="smollm2-135m", dtype=dtype, kv_cache_memory=16 << 20,
                                     quantization=mode), progress=False)
        tok = r.tokenizer
        prompts = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False))["input_ids"] for p in ANSWERS]
        texts[dtype] = [tok.decode(s.output_token_ids) for s in generate(r, prompts, greedy(12))]
    assert texts["bfloat16"] == texts["float32"]
    assert "Paris" in texts["bfloat16"][0]


# --- bfloat16 at large batches: the dense path (dequantized slices through oneDNN) ----------------------------------

@pytest.fixture(scope="module")
def bf16_runners():
    return {mode: ModelRunner(RunnerConfig(model="smollm2-135m", dtype="bfloat16", kv_cache_memory=64 << 20,
                                           quantization=mode), progress=False) for mode in ("none", "q4")}


def topic_prompts(runner: ModelRunner, count: int) -> list[list[int]]:
    return [runner.tokenizer(f"Write a short paragraph about {t}." + " Be brief." * (i // len(TOPICS)))["input_ids"]
            for i, t in enumerate((TOPICS * 3)[:count])]


@pytest.mark.integration
@pytest.mark.first_pass_only  # the lower loop's dense path: test_each_matmul_errs_by_no_more_than_its_formats_allow
def test_bfloat16_dense_path_is_the_bfloat16_model(monkeypatch, bf16_runners):
    """At and above the crossover every quantized matmul multiplies the unquantized bfloat16 model's own weights
    (the dequantized values, rounded as torch rounds them): 36 sequences decoding together under q4 give the
    unquantized bfloat16 model's text, prompt for prompt, where oneDNN sums a packed and a plain bfloat16 weight in
    the same order (bit-identical logits on AMD Zen 4; skipped where it does not, e.g. an AMX Xeon). The crossover is forced to 32 rows so that
    the test means the same on a CPU that would never take the dense path.)"""
    if differs := packed_and_plain_differ(bf16_runners["none"].model.cfg):
        pytest.skip(f"oneDNN sums a packed and a plain bfloat16 weight in different orders on this CPU ({differs}): "
                    "the two models' texts may differ by rounding; test_each_matmul_errs_by_no_more_than_its_formats"
                    "_allow bounds the dense path here")
    monkeypatch.setattr(qmatmul, "choose_path", lambda m, dense_rows: "dense" if m >= 32 else "integer")
    prompts = topic_prompts(bf16_runners["q4"], 36)  # 4 over the crossover: room for one that ends early
    texts = {mode: [s.output_token_ids for s in generate(r, prompts, greedy(8))] for mode, r in bf16_runners.items()}
    assert texts["q4"] == texts["none"]


@pytest.mark.integration
def test_bfloat16_resident_dense_path_is_the_bfloat16_model_bit_for_bit(bf16_runners):
    """--quant-dense-weights resident keeps the dequantized weights (the unquantized model's values, test_quant)
    packed as the unquantized model packs its own (linear.py), so a dense step is that model's step bit for bit on
    any CPU, the AMX Xeon included (the slices' plain weights need oneDNN's packed and plain kernels to agree)."""
    q = ModelRunner(RunnerConfig(model="smollm2-135m", dtype="bfloat16", kv_cache_memory=64 << 20, quantization="q4",
                                 quant_dense_rows="1", quant_dense_weights="resident"), progress=False)
    for ids in topic_prompts(q, 2):
        assert torch.equal(our_logits(q, ids), our_logits(bf16_runners["none"], ids))


@pytest.mark.integration
def test_bfloat16_integer_loop_alone_is_batch_invariant(monkeypatch, bf16_runners):
    """By default (--quant-dense-rows off) every quantized matmul runs the integer loop, whose outputs are the same
    bits in any batch: 22 sequences decoding together give each the text it gets alone, under bfloat16 too. (With
    the dense path on, a token's matmuls depend on whether its step has 32 rows or more: docs/quantization.md
    measures what that changes.)"""
    assert bf16_runners["q4"].quant_dense_rows is None
    r = bf16_runners["q4"]
    prompts = topic_prompts(r, 22)  # batches of 22 rows and fewer: whole and partial tiles of the loop's 4 rows
    together = [s.output_token_ids for s in generate(r, prompts, greedy(10))]
    assert together == [generate(r, [p], greedy(10))[0].output_token_ids for p in prompts]


def quantized_layers(r):
    return [r.model.lm_head] + r.model.layer_matmuls()


def test_quant_dense_weights_resident_reaches_every_quantized_matmul():
    """--quant-dense-weights resident: every quantized matmul keeps its dense path's weights, the start-up line
    says how many bytes that adds, and the dense path then reads them; refused where nothing would read them."""
    cfg = dict(model="tiny-random", dtype="float32", quantization="int8", kv_cache_memory=1 << 20)
    r = ModelRunner(RunnerConfig(**cfg, quant_dense_rows="7", quant_dense_weights="resident"), progress=False)
    layers = quantized_layers(r)
    assert all(x.resident is not None for x in layers)
    assert r.dense_weight_bytes == sum(x.out_features * x.in_features * 4 for x in layers) > 0
    assert f"+{r.dense_weight_bytes / 2**20:.1f} MiB" in r.describe()
    slices = ModelRunner(RunnerConfig(**cfg, quant_dense_rows="7"), progress=False)
    assert all(x.resident is None for x in quantized_layers(slices)) and slices.dense_weight_bytes == 0
    ids = list(range(3, 20))
    assert torch.allclose(our_logits(r, ids), our_logits(slices, ids), rtol=1e-4, atol=1e-4)  # float32 sums
    for bad, match in [(dict(quant_dense_rows="7", quant_dense_weights="resident", quantization="none"),
                        "leave it out"),
                       (dict(quant_dense_weights="resident"), "takes no dense path here"),
                       (dict(quant_dense_rows="7", quant_dense_weights="kept"), "want slices or resident")]:
        with pytest.raises(ModelLoadError, match=match):
            ModelRunner(RunnerConfig(**{**cfg, **bad}), progress=False)


def test_quant_dense_rows_reaches_every_quantized_matmul():
    """RunnerConfig.quant_dense_rows (jitney serve --quant-dense-rows) is what each quantized layer decides by, and
    the start-up line says so; off, the default, says nothing of a dense path."""
    from model_runner.qmatmul import QuantLinear

    on = ModelRunner(RunnerConfig(model="tiny-random", dtype="float32", quantization="int8", kv_cache_memory=1 << 20,
                                  quant_dense_rows="7"), progress=False)
    assert all(isinstance(x, QuantLinear) and x.dense_rows == 7 for x in quantized_layers(on))
    assert "from 7 rows" in on.describe()
    off = ModelRunner(RunnerConfig(model="tiny-random", dtype="float32", quantization="int8", kv_cache_memory=1 << 20),
                      progress=False)
    assert all(x.dense_rows is None for x in quantized_layers(off)) and "rows)" not in off.describe()
