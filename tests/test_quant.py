"""Quantized weights: GGUF blocks kept bit for bit, and the quantized matmul (every kernel loop this CPU can
run) against a float64 reference within the error its formats allow."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from model_runner import native, qmatmul, quant
from model_runner.errors import ModelLoadError
from model_runner.precision import cpuinfo_flags
from model_runner.quant import QK, QuantWeight

GGUF_TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1,
              "q8_0": GGMLQuantizationType.Q8_0}
EPS32 = 2.0 ** -24  # float32 unit roundoff
QMAX = 127 * 254  # the activations' integer range per block (csrc/qmatmul.cpp)


def random_blocks(fmt: str, n: int, k: int, seed: int) -> np.ndarray:
    """A GGUF tensor [n, k] of this format, as llama.cpp's quantizer (gguf.quants) writes it."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).numpy() * 0.1
    return quantize(w, GGUF_TYPES[fmt])


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_gguf_blocks_round_trip(fmt):
    """Repacked for the kernel and back: the same bytes; dequantized: gguf's own floats, bit for bit; and the
    dequantized floats quantized again by gguf give the same blocks (the values are on the format's grid)."""
    raw = random_blocks(fmt, 21, 96, seed=1)  # 21 rows: a partial tile
    w = QuantWeight.from_gguf(fmt, torch.from_numpy(raw), 96)
    assert np.array_equal(w.to_gguf().numpy(), raw)
    ref = dequantize(raw, GGUF_TYPES[fmt]).reshape(21, 96)
    assert np.array_equal(w.dequantize().numpy().view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(quantize(ref, GGUF_TYPES[fmt]), raw)
    rows = torch.tensor([20, 0, 7, 8, 7])
    assert torch.equal(w.dequantize_rows(rows), torch.from_numpy(ref)[rows])
    fused = QuantWeight.cat([w, QuantWeight.from_gguf(fmt, torch.from_numpy(raw[:5]), 96)])
    assert np.array_equal(fused.to_gguf().numpy(), np.concatenate([raw, raw[:5]]))


@pytest.mark.integration
@pytest.mark.first_pass_only  # reads and compares stored bytes: no kernel runs
def test_default_model_blocks_exact():
    """The default model's Q4_1 layers and Q8_0 embedding (the tied head) as stored: bytes and values exact."""
    from gguf import GGUFReader
    from model_runner.gguf import _unpermute, smollm2_gguf_path, stored_blocks
    kept, others = stored_blocks(smollm2_gguf_path())
    assert not others and len(kept) == 30 * 7 + 1
    tensors = {t.name: t for t in GGUFReader(smollm2_gguf_path()).tensors}
    for g, hf, heads in [("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight", 3),
                         ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", None),
                         ("token_embd.weight", "model.embed_tokens.weight", None)]:
        raw = np.asarray(tensors[g].data)
        raw = _unpermute(raw, heads) if heads else raw
        assert np.array_equal(kept[hf].to_gguf().numpy(), raw), g
        ref = dequantize(raw, tensors[g].tensor_type).reshape(kept[hf].shape)
        assert np.array_equal(kept[hf].dequantize().numpy(), ref), g


def test_int8_per_row():
    w = torch.randn(19, 64, generator=torch.Generator().manual_seed(2))
    w[3] = 0  # an all-zero row: scale 0, no division by it
    q = QuantWeight.int8(w)
    scale = w.abs().amax(1, keepdim=True) / 127
    # Round to nearest: within half a step of each row's scale.
    assert ((q.dequantize() - w).abs() <= scale / 2 * (1 + 4 * EPS32)).all()
    assert q.dequantize()[3].eq(0).all()
    with pytest.raises(ModelLoadError, match="multiples of 32"):
        QuantWeight.int8(torch.randn(8, 40))


# --- the matmul ------------------------------------------------------------------------------------------------

def kernel_isas():
    flags = cpuinfo_flags()
    isas = ["native", "portable"]
    if {"avx2", "fma", "f16c"} <= flags and "avx512f" in flags:
        isas.append("avx2")  # the AVX2 loop, as an AVX2-only machine runs it
    return isas


def quant_library(isa: str):
    """The quantized-matmul library of one loop, declared in this process (quant.library is read at every call)."""
    cxx = native._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler: the matmul dequantizes per call (checked by test_torch_fallback)")
    lib = native._load(cxx, isa, quant.SOURCE)
    quant._declare(lib)
    return lib


@pytest.fixture(scope="module", params=kernel_isas())
def lib(request):
    return quant_library(request.param)


def bound(w: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """What the kernel may differ from sum_k w x (float64) by, for weights w exactly as stored.

    Activations are rounded to q d with d = max|x_block| / 127 (float32): |x - q d| <= d / 2, plus the float32
    rounding of x / d and of d (a few units of roundoff). Block dot products are exact integers; each block's
    scale product and its add to the float32 sum round once more (<= (blocks + 2) roundoffs of the sum of
    |w x| terms). A bfloat16 output then rounds to 8 significant bits (half a unit: 2^-9 relative)."""
    m, k = x.shape
    xb = x.double().view(m, k // QK, QK)
    half_step = xb.abs().amax(-1) / (2 * QMAX) * (1 + 8 * EPS32)                # [m, nb]
    wb = w.double().abs().view(w.shape[0], k // QK, QK).sum(-1)                  # [n, nb]
    quant_err = half_step @ wb.T
    float_err = (k // QK + 4) * 2 * EPS32 * (x.double().abs() + xb.abs().amax(-1).repeat_interleave(QK, 1) / 127) \
        @ w.double().abs().T
    y = x.double() @ w.double().T
    out_err = (y.abs() + quant_err + float_err) * 2.0 ** -8 if out_dtype == torch.bfloat16 else 0
    return quant_err + float_err + out_err


def weight(fmt: str, n: int, k: int, seed: int) -> QuantWeight:
    if fmt == "int8":
        return QuantWeight.int8(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return QuantWeight.from_gguf(fmt, torch.from_numpy(random_blocks(fmt, n, k, seed)), k)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_against_float64(lib, fmt, dtype):
    n, k = 37, 160  # 37 rows: a partial tile; 5 blocks
    w = weight(fmt, n, k, seed=3)
    g = torch.Generator().manual_seed(4)
    # 37 rows: two groups of 16 (the AMX tiles where the CPU has them) and a partial one (the vector loop)
    x = (torch.randn(37, k + 8, generator=g) * torch.rand(37, 1, generator=g) * 4).to(dtype)[:, :k]  # row stride
    x[2, 32:64] = 0       # an all-zero block: scale 0
    x[5, 7] = 300.0       # an outlier: its block's step is large, the others' are not
    y = qmatmul.matmul([w], x, lib)
    assert y.dtype == dtype and y.shape == (37, n)
    ref = x.double() @ w.dequantize().double().T
    err, limit = (y.double() - ref).abs(), bound(w.dequantize(), x, dtype)
    assert (err <= limit).all(), f"worst: {(err - limit).max():.3g} over the bound"


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_batch_invariant(lib, fmt, dtype):
    """A row's output is the same bits alone or among 39 others: the loop's row groups and their remainders alike,
    and on a CPU with AMX a full group of 16 on the tiles against a row alone on the vector loop."""
    w = weight(fmt, 40, 64, seed=5)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    together = qmatmul.matmul([w], x, lib)
    for i in (0, 3, 4, 12, 15, 16, 39):
        assert torch.equal(qmatmul.matmul([w], x[i: i + 1], lib), together[i: i + 1])
    for lo, hi in ((4, 11), (10, 40), (3, 35)):
        assert torch.equal(qmatmul.matmul([w], x[lo:hi], lib), together[lo:hi])


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8"])
def test_amx_loop_is_the_vector_loops_bits(fmt):
    """Where the CPU has AMX, steps of 16 rows and more sum on the tiles: the same bits as the AVX-512 VNNI loop
    (forced by jitney_qmatmul_set_amx(0)) for any row count and a weight with a partial tile."""
    lib = quant_library("native")
    if not lib.jitney_qmatmul_set_amx(1):
        pytest.skip("no AMX int8 on this CPU (or this build)")
    w = weight(fmt, 45, 192, seed=11)  # 6 tiles: two pairs and a pair whose second tile is partial
    g = torch.Generator().manual_seed(12)
    try:
        for m in (16, 17, 32, 50):
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(m, 192, generator=g) * 3).to(dtype)
                tiles = qmatmul.matmul([w], x, lib)
                lib.jitney_qmatmul_set_amx(0)
                vector = qmatmul.matmul([w], x, lib)
                lib.jitney_qmatmul_set_amx(1)
                assert torch.equal(tiles, vector), (m, dtype)
    finally:
        lib.jitney_qmatmul_set_amx(1)


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The activations' quantization rule (csrc/qmatmul.cpp, quantize_row_scalar) in torch: per block of 32, Q =
    round(x inv) to nearest even with inv = QMAX / max|x| in float32 (0 below 2^-112, where it would overflow),
    clamped; digits hi = round(Q / 254) half away from zero and lo = Q - 254 hi; the scale max|x| / QMAX and the
    sum of Q."""
    xb = x.float().view(-1, QK)
    amax = xb.abs().amax(-1)
    inv = torch.where(amax >= 2.0 ** -112, torch.tensor(float(QMAX)) / amax, torch.tensor(0.0))
    v = torch.round(xb * inv[:, None]).clamp(-QMAX, QMAX).long()
    hi = v.sign() * ((v.abs() + 127) // 254)
    return hi.flatten(), (v - 254 * hi).flatten(), amax / QMAX, v.sum(-1)


def quantize_native(lib, x: torch.Tensor, scalar: bool) -> tuple[torch.Tensor, ...]:
    k = x.numel()
    hi, lo = torch.empty(k, dtype=torch.int8), torch.empty(k, dtype=torch.int8)
    d, s = torch.empty(k // QK), torch.empty(k // QK, dtype=torch.int32)
    lib.jitney_qmatmul_quantize_row(int(x.dtype == torch.bfloat16), int(scalar), x.data_ptr(), k, hi.data_ptr(),
                                    lo.data_ptr(), d.data_ptr(), s.data_ptr())
    return hi.long(), lo.long(), d, s.long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_is_the_rule(lib, dtype):
    """The loop's quantization of activations (16 values at a time where the CPU has AVX-512) gives the rule's
    digits, scales and sums exactly, on generated blocks: every magnitude from subnormal to 1e30, zeros and -0.0,
    and values placed on the rounding ties of Q (x inv = n + 1/2) and of the digit split (|Q| = 254 n + 127)."""
    g = torch.Generator().manual_seed(13)
    blocks = [torch.randn(64, QK, generator=g) * 10.0 ** torch.randint(-40, 31, (64, 1), generator=g).float(),
              torch.zeros(2, QK), -torch.zeros(1, QK)]
    ties = torch.randn(8, QK, generator=g)
    ties[:, 0] = 1.0  # max|x| = 1: inv = QMAX, and x = (n + 1/2) / QMAX lands Q on a tie (where float32 holds it)
    ties[:, 1:] = (torch.randint(-QMAX, QMAX, (8, QK - 1), generator=g) + 0.5) / QMAX
    split = torch.ones(8, QK)
    split[:, 1:] = (254 * torch.randint(-127, 127, (8, QK - 1), generator=g) + 127) / QMAX  # |Q| = 254 n + 127, +-
    x = torch.cat(blocks + [ties, split]).flatten().to(dtype)
    want = quantize_reference(x)
    for scalar in (True, False):
        got = quantize_native(lib, x, scalar)
        for name, a, b in zip(("hi", "lo", "scale", "sum"), got, want):
            assert torch.equal(a, b), f"{name} (scalar={scalar}): {int((a != b).sum())} differ"


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8"])
def test_matmul_tile_alone_or_paired(lib, fmt):
    """A tile of 8 weight rows gives the same bits computed alone or beside its neighbour (the AVX-512 loop takes
    tiles two at a time on 16 lanes, a lone last tile on 8), at every activation-row group size."""
    parts = [weight(fmt, 8, 96, seed=s) for s in (7, 8, 9)]
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    joined = qmatmul.matmul([QuantWeight.cat(parts)], x, lib)  # tiles 0-1 a pair, tile 2 alone
    for i, p in enumerate(parts):
        assert torch.equal(qmatmul.matmul([p], x, lib), joined[:, 8 * i: 8 * i + 8])
    assert torch.equal(qmatmul.matmul([QuantWeight.cat(parts[1:])], x, lib), joined[:, 8:])


# --- the dense path: dequantized slices through torch's matmul (large batches under bfloat16) ---------------------

@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8"])
def test_dequantize_tiles_is_dequantize_bit_for_bit(lib, fmt):
    """The native dequantization gives dequantize()'s float32 values (gguf's, bit for bit), and for bfloat16
    their rounding by torch's cast (an unquantized bfloat16 model's weights): any range of tiles, the padded
    rows of a partial tile zero."""
    w = weight(fmt, 37, 160, seed=9)  # 5 tiles, the last one 5 rows
    ref = w.dequantize()
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((40, 160), float("nan"), dtype=dtype)
        w.dequantize_tiles(0, 5, out, lib)
        assert torch.equal(out[:37], ref.to(dtype)) and out[37:].eq(0).all()
        part = torch.full((24 + 3, 168), float("nan"), dtype=dtype)[:, :160]  # a row stride of its own
        w.dequantize_tiles(1, 3, part, lib)
        assert torch.equal(part[:24], ref[8:32].to(dtype)) and part[24:].isnan().all()  # nothing past the tiles


def dense_bound(w: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """What the dense path may differ from sum_k w x (float64) by, for weights w exactly as stored: the compute
    dtype's own errors, those of an unquantized model of these weights in that dtype. bfloat16 keeps 8
    significant bits, so rounding to it errs by up to half a unit in the last place, 2^-8 relative: once for each
    weight (2^-8 of sum |w x|) and once for the output (2^-8 of it). Products of two bfloat16 values are exact in
    float32 and their sum accumulates in float32 (oneDNN's bfloat16 matmul): at most k + 2 float32 roundings
    (2^-24 each) of sum |w x|. float32: the weights are exact, the sum's roundings only."""
    k = x.shape[1]
    wx = x.double().abs() @ w.double().abs().T
    y = x.double() @ w.double().T
    if out_dtype == torch.float32:
        return (k + 2) * EPS32 * wx
    inner = wx * (2.0 ** -8 + (k + 2) * EPS32 * (1 + 2.0 ** -8))
    return inner + (y.abs() + inner) * 2.0 ** -8


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_path_against_float64(lib, fmt, dtype):
    """The dense path, on every loop's dequantization, within the compute dtype's own bound of the float64
    product. (Under bfloat16 that is not inside the integer loop's bound: the integer loop multiplies the
    weights as stored, the dense path their bfloat16 roundings, as an unquantized bfloat16 model does.)"""
    w = weight(fmt, 37, 160, seed=3)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(40, 160 + 8, generator=g) * torch.rand(40, 1, generator=g) * 4).to(dtype)[:, :160]
    x[5, 7] = 300.0
    y = qmatmul.matmul([w], x, lib, path="dense")
    assert y.dtype == dtype and y.shape == (40, 37)
    ref = x.double() @ w.dequantize().double().T
    err, limit = (y.double() - ref).abs(), dense_bound(w.dequantize(), x, dtype)
    assert (err <= limit).all(), f"worst: {(err - limit).max():.3g} over the bound"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_path_slices_across_fused_parts(lib, monkeypatch, dtype):
    """A fused weight of mixed formats and partial tiles, cut into slices of 64 rows that straddle the parts:
    every column where it belongs (the integer loop on the same parts, and the float64 product)."""
    monkeypatch.setattr(qmatmul, "SLICE_BYTES", 64 * 160 * dtype.itemsize)
    parts = [weight("q4_1", 37, 160, 3), weight("q8_0", 21, 160, 4), weight("q4_0", 45, 160, 5),
             weight("int8", 9, 160, 6)]
    x = torch.randn(33, 160, generator=torch.Generator().manual_seed(10)).to(dtype)
    w = torch.cat([p.dequantize() for p in parts])
    y = qmatmul.matmul(parts, x, lib, path="dense")
    assert y.shape == (33, 112)
    err = (y.double() - x.double() @ w.double().T).abs()
    assert (err <= dense_bound(w, x, dtype)).all()
    integer = qmatmul.matmul(parts, x, lib, path="integer")
    assert ((integer.double() - x.double() @ w.double().T).abs() <= bound(w, x, dtype)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_dense_weights_are_the_dense_paths_values(lib, monkeypatch, dtype):
    """--quant-dense-weights resident: the weights a layer keeps are each value as the dense path's slices hold
    it (every format; parts ending in partial tiles), read back exactly through an identity input; a dense step
    over them is within the compute dtype's bound of the float64 product, as the slices' is; below the crossover
    the integer loop runs as before."""
    monkeypatch.setattr(quant, "library", lambda: lib)
    parts = [weight("q4_1", 37, 160, 3), weight("q8_0", 21, 160, 4), weight("q4_0", 45, 160, 5),
             weight("int8", 9, 160, 6)]
    layer = qmatmul.QuantLinear(parts, None, dense_rows=8)
    w = torch.cat([p.dequantize() for p in parts])
    assert layer.keep_dequantized(dtype, lib) == w.numel() * dtype.itemsize
    assert torch.equal(layer(torch.eye(160, dtype=dtype)), w.to(dtype).T)  # one exact product per output
    x = torch.randn(33, 160, generator=torch.Generator().manual_seed(10)).to(dtype)
    assert ((layer(x).double() - x.double() @ w.double().T).abs() <= dense_bound(w, x, dtype)).all()
    assert torch.equal(layer(x[:7]), qmatmul.matmul(parts, x[:7], lib, path="integer"))
    monkeypatch.setattr(quant, "library", lambda: None)  # no native kernels: torch dequantizes, the same values
    layer.keep_dequantized(dtype)
    assert torch.equal(layer(torch.eye(160, dtype=dtype)), w.to(dtype).T)


def test_path_choice(monkeypatch):
    """--quant-dense-rows: off (the default) never takes the dense path; auto takes it for bfloat16 on a CPU with
    native bfloat16 dot products from its crossover (32 rows with AVX512-BF16, 80 with AMX; 32 and 48 with the
    weights kept dequantized), never for float32
    (the integer loop is faster than float32's matmul) or without native bfloat16; N from N rows in any dtype
    (0: never); anything else is refused."""
    from model_runner import precision
    from model_runner.errors import ModelLoadError
    for flags, rows, kept in [({"avx512f", "avx512_bf16"}, 32, 32), ({"avx512f", "avx512_bf16", "amx_bf16"}, 80, 48)]:
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: set(flags))
        qmatmul._bf16_crossover.cache_clear()
        auto = qmatmul.dense_min_rows(torch.bfloat16, "auto")
        assert qmatmul.choose_path(rows - 1, auto) == "integer" and qmatmul.choose_path(rows, auto) == "dense"
        assert qmatmul.dense_min_rows(torch.bfloat16, "auto", resident=True) == kept  # --quant-dense-weights
        assert qmatmul.dense_min_rows(torch.bfloat16, "9", resident=True) == 9
        assert qmatmul.dense_min_rows(torch.float32, "auto") is None
        assert qmatmul.dense_min_rows(torch.bfloat16, "off") is None
        assert qmatmul.dense_min_rows(torch.bfloat16) is None
    for dtype in (torch.bfloat16, torch.float32):
        assert qmatmul.dense_min_rows(dtype, "8") == 8 and qmatmul.dense_min_rows(dtype, "0") is None
    assert qmatmul.choose_path(4096, None) == "integer" and qmatmul.choose_path(8, 8) == "dense"
    for bad in ("", "-1", "1.5", "on", "32 "):
        with pytest.raises(ModelLoadError, match="quant-dense-rows"):
            qmatmul.dense_min_rows(torch.bfloat16, bad)
    for flags in ({"avx512f"}, {"avx2", "fma"}, set()):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: set(flags))
        qmatmul._bf16_crossover.cache_clear()
        assert qmatmul.dense_min_rows(torch.bfloat16, "auto") is None
    monkeypatch.undo()
    qmatmul._bf16_crossover.cache_clear()  # this CPU's again


def test_torch_fallback_is_the_dequantized_weight(monkeypatch):
    """Without native kernels the matmul multiplies by the dequantized weight (the same numbers)."""
    monkeypatch.setattr(quant, "library", lambda: None)
    w = weight("q4_1", 16, 64, seed=7)
    x = torch.randn(3, 64)
    torch.testing.assert_close(qmatmul.matmul([w], x), x @ w.dequantize().T, rtol=0, atol=0)


def test_memory_plan_uses_the_formats_real_sizes():
    from benchmarks.memory_plan import WEIGHT_FORMAT_BYTES
    for fmt in ("q4_0", "q4_1", "q8_0"):
        assert WEIGHT_FORMAT_BYTES[fmt] == quant.FORMATS[fmt][1] / QK
    w = weight("q4_1", 64, 256, seed=8)
    assert w.nbytes == 64 * 256 * WEIGHT_FORMAT_BYTES["q4_1"]  # whole tiles: nothing beyond the file's bytes
