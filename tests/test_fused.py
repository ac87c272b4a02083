"""A quantized model's decoder stack in one native call (model_runner/fused.py, csrc/decoder.cpp) computes bit for
bit what model.py's Python loop computes, for every step it takes: decode rows, prompt chunks (fresh or after a
cached prefix) and mixes of both, under every compute and KV-cache dtype, every weight format (mixed formats in
one fused matmul included) and every kernel loop this CPU runs. Exact equality, not a tolerance: the same
kernels run on the same arguments in the same order, so any difference is a wiring mistake (a wrong stride,
buffer or norm), which equality catches and a bound might not."""
import os

import pytest
import torch
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings, strategies as st

from benchmarks.steps import held
from model_runner import fused, native, qmatmul, quant
from model_runner.loader import load_model_dir

from .test_native import runnable_isas
from .test_quant import GGUF_TYPES
from .test_quant_model import tiny_with

# The fused call needs the native kernels: without a compiler, or with them turned off, every step takes the
# Python loop (test_quant_model and test_native cover what runs then).
pytestmark = pytest.mark.skipif(native._compiler() is None or os.environ.get("JITNEY_NATIVE", "1") == "0",
                                reason="no native kernels here: the fused call is never built")

# Each matmul weight's format, by the end of its name: one format everywhere, or several, so that the fused
# q/k/v and gate/up matmuls hold parts of different formats (each its own integer loop call, its own columns);
# the output head (outside the stack) in q8_0.
MIXED = {"q_proj.weight": "q4_0", "k_proj.weight": "q4_0", "v_proj.weight": "q8_0", "o_proj.weight": "q4_1",
         "gate_proj.weight": "q4_1", "up_proj.weight": "int8", "down_proj.weight": "q8_0"}
FORMATS = ["q4_1", "int8", "mixed"]
# (compute, KV cache): every pair the CPU serves, the int8 cache under both compute dtypes.
PRECISIONS = [("float32", "float32"), ("float32", "bfloat16"), ("float32", "int8"), ("bfloat16", "bfloat16"),
              ("bfloat16", "int8")]
# A step: (context, tokens fed) per sequence. One token is a decode row; more are a prompt chunk, after a cached
# prefix where context > tokens. tiny-random, 16-token blocks: up to 6 blocks per sequence.
SEQUENCES = st.lists(st.integers(1, 90).flatmap(lambda ctx: st.tuples(st.just(ctx), st.sampled_from(
    sorted({1, ctx, max(1, ctx // 3)})))), min_size=1, max_size=6)


def quantize_as(weights: dict, fmt: str) -> dict:
    def one(name, w):
        f = next((f for end, f in MIXED.items() if name.endswith(end)), "q8_0") if fmt == "mixed" else fmt
        if f == "int8":
            return quant.QuantWeight.int8(w)
        return quant.QuantWeight.from_gguf(f, torch.from_numpy(quantize(w.float().numpy(), GGUF_TYPES[f])), w.shape[1])
    return {n: one(n, w) if quant.is_matmul_weight(n) and w.dim() == 2 else w for n, w in weights.items()}


@pytest.fixture(scope="module")
def runners():
    """tiny-random quantized to each format, at each precision: built once."""
    weights = load_model_dir("tiny-random", progress=False)[1]
    return {(fmt, p): tiny_with(quantize_as(weights, fmt), *p) for fmt in FORMATS for p in PRECISIONS}


@pytest.fixture(scope="module", params=runnable_isas())
def isa(request):
    """Every kernel loop this CPU runs: the attention, elementwise and matmul libraries all built for it (the
    fused call reads their kernels' addresses at each call)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JITNEY_ISA", request.param)
    caches = (native.library, native.prefill_library, quant.library, fused.library)
    for c in caches:
        c.cache_clear()
    assert native.library() is not None and quant.library() is not None and fused.library() is not None
    yield request.param
    mp.undo()
    for c in caches:  # later tests load the default build
        c.cache_clear()


def both_paths(runner, step: list[tuple[int, int]]) -> tuple[bool, list[torch.Tensor]]:
    """Runs one forward of this step on the fused call and on the Python loop, the cache restored in between:
    (whether the fused call took it, [hidden states, cache] from each)."""
    model = runner.model
    with held(runner, [c for c, _ in step], [n for _, n in step]) as plan, torch.inference_mode():
        items = sorted(plan, key=lambda it: (it[1] != 1, it[0].num_computed_tokens))  # as runner._execute orders
        meta, ids, pos = runner._prepare(items)
        before = runner.kv_cache.clone()
        took = model.fused.runs(meta, ids.shape[0])
        out = [model.forward(ids, pos, runner.kv_cache, meta), runner.kv_cache.clone()]
        runner.kv_cache.copy_(before)
        fused_decoder, model.fused = model.fused, None
        try:
            out += [model.forward(ids, pos, runner.kv_cache, meta), runner.kv_cache.clone()]
        finally:
            model.fused = fused_decoder
    return took, out


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step=SEQUENCES)
def test_the_fused_stack_is_the_python_loop_bit_for_bit(isa, runners, fmt, precision, step):
    runner = runners[fmt, precision]
    assert runner.model.fused is not None, "every layer matmul is quantized: the fused call should be there"
    took, (h_fused, kv_fused, h_loop, kv_loop) = both_paths(runner, step)
    # Decode-only steps always take it; prompt chunks do unless the tiled prompt kernel runs them (bfloat16 on
    # AVX512-BF16), which the fused call leaves to the Python loop.
    assert took or any(n > 1 for _, n in step), step
    assert torch.equal(h_fused, h_loop), step
    assert torch.equal(kv_fused, kv_loop), step


def test_steps_the_fused_call_leaves_to_the_python_loop(runners, monkeypatch):
    """The dense path (--quant-dense-rows), the PyTorch elementwise ops or attention (benchmarks.kernels turns
    them off) and tiled prompt chunks each take the Python loop, as do models with any float layer matmul."""
    runner = runners["q4_1", PRECISIONS[0]]
    f = runner.model.fused
    with held(runner, [5, 9], [1, 1]) as plan:
        meta, ids, _ = runner._prepare(plan)
        assert f.runs(meta, 2)
        monkeypatch.setattr(qmatmul, "choose_path", lambda m, rows: "dense")
        assert not f.runs(meta, 2)
        monkeypatch.undo()
        runner.use_kernels(attention=True, elementwise=False)
        try:
            assert not f.runs(meta, 2)
        finally:
            runner.use_kernels(attention=True, elementwise=True)
        meta.native.chunks = torch.zeros(1, 3, dtype=torch.int32)
        assert not f.runs(meta, 2)
    weights = load_model_dir("tiny-random", progress=False)[1]
    float_o = {n: weights[n] if n.endswith("o_proj.weight") else w for n, w in quantize_as(weights, "q4_1").items()}
    assert tiny_with(float_o, *PRECISIONS[0]).model.fused is None
