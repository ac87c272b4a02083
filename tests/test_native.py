"""The native paged-attention kernel against a plain softmax(q k^T) v over each sequence's own blocks."""
import os
import random
import shutil

import pytest
import torch

from model_runner import native
from model_runner.int8_kv import quantize_rows
from model_runner.precision import cpuinfo_flags

from .reference import our_logits


@pytest.fixture(scope="module", autouse=True)
def built():
    if native._compiler() is None or os.environ.get("JITNEY_NATIVE") == "0":
        pytest.skip("no C++ compiler here, or JITNEY_NATIVE=0: jitney runs the PyTorch path")
    # With a compiler present the kernels must build: a silent fallback would hide a broken kernel.
    assert native.library() is not None, "the native kernels failed to build (see the warning logged)"


def reference(q, cache, tables, lens, scale):
    """Float64 attention of each sequence's query over its first lens[i] cached tokens."""
    _, kvh, _, bs, d = cache.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, n in enumerate(lens):
        blocks = tables[i, : -(-n // bs)].long()
        k, v = (cache[j][:, blocks].reshape(kvh, -1, d)[:, :n].double() for j in (0, 1))
        qi = q[i].double().view(kvh, -1, d)
        out[i] = (torch.softmax(qi @ k.transpose(-1, -2) * scale, -1) @ v).reshape(-1, d)
    return out


def random_case(heads, kv_heads, head_dim, block_size, lens, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 7
    cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).int()  # scattered, non-contiguous tables
    width = max(-(-n // block_size) for n in lens) + 2       # wider than any sequence needs (padding)
    tables, used = torch.zeros(len(lens), width, dtype=torch.int32), 0
    for i, n in enumerate(lens):
        k = -(-n // block_size)
        tables[i, :k] = order[used: used + k]
        used += k
    # q as the model passes it: a slice of a wider [tokens, heads + kv_heads, head_dim] tensor.
    q = torch.randn(len(lens), heads + kv_heads, head_dim, generator=gen).to(dtype)[:, :heads]
    return q, cache, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),   # SmolLM2's shape
    (9, 3, 64, 32),   # blocks of two sixteen-key groups
    (8, 2, 128, 8),   # blocks shorter than a sixteen-key group
    (4, 4, 64, 16),   # multi-head (no grouping)
    (8, 2, 128, 16),  # Llama-style head size
    (6, 3, 48, 8),    # a head size with no specialised loop, another block size
    (2, 1, 32, 1),    # one token per block
    (16, 1, 64, 16),  # 16 query heads per kv head: the portable loop on every CPU (the AVX-512 one stops at 8)
    (32, 2, 128, 16), # the same, at head size 128
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    rng = random.Random(head_dim + block_size)
    lens = [1, 2, block_size, block_size + 1, 3 * block_size - 1] + [rng.randrange(1, 300) for _ in range(11)]
    q, cache, tables, ctx = random_case(heads, kv_heads, head_dim, block_size, lens, dtype, seed=head_dim)
    assert native.supported("cpu", dtype, heads, kv_heads, head_dim, block_size)
    out = native.paged_attention(q, cache, tables, ctx, head_dim ** -0.5)
    want = reference(q, cache, tables, lens, head_dim ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    # float32: summation order only; bfloat16: the output's own rounding (8 bits of mantissa).
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("v_scale", [4.0, 16.0])
def test_bfloat16_error_is_the_outputs_own_rounding_at_any_scale_of_values(v_scale):
    """Short contexts of large values: rounding the softmax weights to bf16 (as some kernels do) would put the
    error at several times the output's own rounding here; float32 weights keep it within that rounding."""
    q, cache, tables, ctx = random_case(6, 2, 64, 16, [2, 3, 5, 8] * 8, torch.bfloat16, seed=5)
    cache[1] *= v_scale
    out = native.paged_attention(q, cache, tables, ctx, 0.125)
    want = reference(q, cache, tables, ctx.tolist(), 0.125)
    # One rounding of the output to bf16: half an ulp, 2^-9 of its magnitude.
    assert ((out.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_rows_attend_causally_through_one_shared_table(dtype):
    """A prompt chunk: row j sees tokens 0..start+j of one sequence; the table is shared (stride 0)."""
    start, n = 37, 50
    q, cache, tables, _ = random_case(9, 3, 64, 16, [start + n], dtype, seed=3)
    q = torch.randn(n, 12, 64).to(dtype)[:, :9]
    ctx = torch.arange(start + 1, start + n + 1, dtype=torch.int32)
    out = native.paged_attention(q, cache, tables.expand(n, -1), ctx, 0.125)
    want = reference(q, cache, tables.expand(n, -1), ctx.tolist(), 0.125)
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_each_sequence_is_independent_of_its_batch():
    """Batch invariance at the kernel: a sequence's output is bit-identical alone and among others."""
    q, cache, tables, ctx = random_case(9, 3, 64, 16, [5, 70, 300, 17], torch.bfloat16, seed=1)
    together = native.paged_attention(q, cache, tables, ctx, 0.125)
    for i in range(4):
        alone = native.paged_attention(q[i: i + 1], cache, tables[i: i + 1], ctx[i: i + 1], 0.125)
        assert torch.equal(alone[0], together[i])


def test_limits_refuse_what_the_kernel_cannot_hold():
    assert not native.supported("cpu", torch.float16, 9, 3, 64, 16)
    assert not native.supported("cuda", torch.bfloat16, 9, 3, 64, 16)
    assert not native.supported("cpu", torch.float32, 64, 2, 64, 16)   # 32 query heads per kv head
    assert not native.supported("cpu", torch.float32, 8, 8, 512, 16)   # head size
    assert not native.supported("cpu", torch.float32, 8, 8, 64, 1024)  # block size
    assert not native.supported("cpu", torch.float32, 9, 2, 64, 16)    # heads not a multiple


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("CXX", "/bin/false")                 # a "compiler" that always fails
    native.reload()
    try:
        assert native.library() is None
        assert not native.supported("cpu", torch.float32, 9, 3, 64, 16)
        assert "native kernels failed to build" in caplog.text
    finally:
        monkeypatch.undo()
        native.reload()
    assert native.library() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_index_copy(dtype):
    from model_runner.attention import write_kv
    gen = torch.Generator().manual_seed(4)
    cache = torch.randn(2, 3, 30, 16, 64, generator=gen).to(dtype)
    want = cache.clone()
    qkv = torch.randn(300, 15, 64, generator=gen).to(dtype)    # strided views, as the model passes them
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.randperm(480, generator=gen)[:300]          # scattered; over 256 rows: the threaded copy
    write_kv(want[0], slots, k)
    write_kv(want[1], slots, v)
    native.write_kv(cache, slots, k, v)
    assert torch.equal(cache, want)


# The rope_write_kv cases: compute dtype and cache dtype, as the runner pairs them (--dtype x --kv-cache-dtype).
ROPE_TYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.int8),
              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.int8)]


def widened(cache: torch.Tensor) -> torch.Tensor:
    """A cache's values as float32 (int8 rows dequantized)."""
    from model_runner.int8_kv import dequantize_rows
    return dequantize_rows(cache) if cache.dtype == torch.int8 else cache.float()


@pytest.mark.parametrize("dtype,kv_dtype", ROPE_TYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("rows,head_dim", [(5, 64), (100, 64), (7, 48)])  # from 65 rows: the threaded loop
def test_each_instruction_set_rope_write_kv_is_the_pytorch_path(isa, dtype, kv_dtype, rows, head_dim):
    """The fused rotary embedding and cache write against the PyTorch path (rope.apply_rotary, then the two
    index copies), on random positions and values, strided qkv rows as the projection leaves them.
    Bfloat16: the same bits (both products are exact in float32, so the kernel's roundings are the PyTorch
    path's). Float32: the sum x cos + roll(x) sin may be fused (one rounding fewer), so rotated values agree to
    within two float32 roundings of the row's largest value; a bfloat16 or int8 cache then holds them rounded,
    and a value within that of a rounding boundary may land one step of the cache's format away."""
    from model_runner.attention import AttentionMetadata, rotate_and_store
    from model_runner.kv_cache import kv_row_elements
    from model_runner.rope import RotaryEmbedding
    heads, kvh, blocks, bs = 9, 3, 40, 16
    gen = torch.Generator().manual_seed(rows + head_dim)
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, None, "cpu")
    cos, sin = rope.cos_sin(torch.randint(0, 4096, (rows,), generator=gen), dtype)
    wide = torch.randn(rows, heads + 2 * kvh + 1, head_dim, generator=gen).to(dtype)  # a spare head: strided rows
    qkv = wide[:, : heads + 2 * kvh]
    slots = torch.randperm(blocks * bs, generator=gen)[:rows]
    row = kv_row_elements(head_dim, kv_dtype)
    cache = torch.zeros(2, kvh, blocks, bs, row, dtype=kv_dtype)
    ours, ours_cache, theirs_cache = wide.clone()[:, : heads + 2 * kvh], cache.clone(), cache.clone()
    native.rope_write_kv(ours, heads, cos, sin, ours_cache, slots)
    q, k, v = rotate_and_store(qkv, heads, cos, sin, theirs_cache, AttentionMetadata(slots, [], []))
    theirs = torch.cat([q, k, v], dim=1)
    if dtype == torch.bfloat16:
        assert torch.equal(ours, theirs) and torch.equal(ours_cache, theirs_cache)
        return
    xmax = qkv.abs().amax().item()
    torch.testing.assert_close(ours[:, : heads + kvh], theirs[:, : heads + kvh], rtol=0, atol=2.0 ** -22 * xmax)
    assert torch.equal(ours[:, heads + kvh:], qkv[:, heads + kvh:])  # the values untouched
    step = {torch.float32: 2.0 ** -22 * xmax, torch.bfloat16: 2.0 ** -8 * 2 * xmax, torch.int8: 1.01 * 2 * xmax / 127}
    torch.testing.assert_close(widened(ours_cache), widened(theirs_cache), rtol=0, atol=step[kv_dtype])


# Every instruction set this CPU runs, in one process: each test below builds (or finds cached) the kernels for
# one JITNEY_ISA, so the AVX-512, AVX2 and portable loops are all checked on an AVX-512 machine.
def runnable_isas():
    """The keys of native.ISA_FLAGS this CPU can run: native and portable always, avx2 with AVX2 and FMA. Not
    avx512 (an AMX Xeon standing in for a Zen 4): its loops are the native build's with the tiles off, which the
    tests of the tiled kernels already run beside the tiles (jitney_qmatmul_set_amx, native.prefill_loops)."""
    flags = cpuinfo_flags()
    return [isa for isa in native.ISA_FLAGS if isa != "avx512" and (isa != "avx2" or {"avx2", "fma"} <= flags)]


def test_the_no_amx_build_is_asked_for_only_where_there_is_avx512(monkeypatch):
    """JITNEY_ISA=avx512: accepted on an AVX-512 CPU, where the AMX flags leave the CPU's description (so the
    dense-path crossover and the start-up line follow a Zen 4's), refused with a reason elsewhere."""
    from model_runner import precision
    monkeypatch.setenv("JITNEY_ISA", "avx512")
    flags = cpuinfo_flags()
    if "avx512f" not in flags:
        with pytest.raises(ValueError, match="needs a CPU with AVX-512"):
            native.requested_isa()
        return
    assert native.requested_isa() == "avx512"
    assert not any(f.startswith("amx") for f in precision.cpu_flags())
    assert "AMX left out" in precision.cpu_kind() if "amx_tile" in flags else "AMX" not in precision.cpu_kind()


def expected_loop(isa):
    """The loop a build for `isa` holds on this CPU, as native.isa() names it."""
    flags = cpuinfo_flags()
    if isa == "native" and "avx512f" in flags:
        return "avx512-bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if isa != "portable" and {"avx2", "fma"} <= flags else "portable"


@pytest.fixture(params=runnable_isas())
def isa(request, monkeypatch):
    monkeypatch.setenv("JITNEY_ISA", request.param)
    native.reload()
    assert native.library() is not None, f"the kernels failed to build for JITNEY_ISA={request.param}"
    yield request.param
    native.reload()  # monkeypatch then restores JITNEY_ISA: later tests load the default build


# Query and cache types: float32 throughout, float32 queries over a bfloat16 cache (the default where the CPU
# has no bfloat16 arithmetic), bfloat16 throughout.
TYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
TYPE_IDS = ["float32", "float32-over-bf16", "bf16"]


def typed_case(heads, kv_heads, head_dim, block_size, lens, q_dtype, kv_dtype, seed):
    q, cache, tables, ctx = random_case(heads, kv_heads, head_dim, block_size, lens, torch.float32, seed)
    return q.to(q_dtype), cache.to(kv_dtype), tables, ctx


def test_each_instruction_set_names_its_loop(isa):
    assert native.isa() == expected_loop(isa)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),   # SmolLM2's shape
    (8, 2, 128, 8),   # Llama's head size; blocks shorter than a group of keys
    (6, 3, 48, 8),    # a head size with no specialised loop
    (16, 1, 64, 16),  # 16 query heads per kv head: the portable loop everywhere
])
@pytest.mark.parametrize("q_dtype,kv_dtype", TYPES, ids=TYPE_IDS)
def test_each_instruction_set_matches_the_reference(isa, heads, kv_heads, head_dim, block_size, q_dtype, kv_dtype):
    rng = random.Random(head_dim)
    lens = [1, 7, block_size, block_size + 1, 3 * block_size - 1] + [rng.randrange(1, 300) for _ in range(5)]
    q, cache, tables, ctx = typed_case(heads, kv_heads, head_dim, block_size, lens, q_dtype, kv_dtype, seed=7)
    assert native.supported("cpu", q_dtype, heads, kv_heads, head_dim, block_size, kv_dtype)
    out = native.paged_attention(q, cache, tables, ctx, head_dim ** -0.5)
    # The reference reads the cache as stored (bfloat16 widened to float64 is exact), so a bfloat16 cache adds
    # no error of its own here. Float32 output: only float32 roundings of the sums remain, 2^-24 (6e-8)
    # relative each, over sums of head_dim products and up to ~300 weighted values; independent roundings add
    # up like a random walk, sqrt(300) * 2^-24 ~ 1e-6 of outputs of magnitude ~1: 2e-6, as the float32 bound
    # above. Bfloat16 output: its own rounding, 2^-9 relative (8 bits of mantissa), on values up to ~2: 8e-3.
    want = reference(q, cache, tables, lens, head_dim ** -0.5)
    tol = 2e-6 if q_dtype == torch.float32 else 8e-3
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("q_dtype,kv_dtype", TYPES, ids=TYPE_IDS)
def test_each_instruction_set_keeps_sequences_independent_of_their_batch(isa, q_dtype, kv_dtype):
    q, cache, tables, ctx = typed_case(9, 3, 64, 16, [5, 70, 300, 17], q_dtype, kv_dtype, seed=1)
    together = native.paged_attention(q, cache, tables, ctx, 0.125)
    for i in range(4):
        alone = native.paged_attention(q[i: i + 1], cache, tables[i: i + 1], ctx[i: i + 1], 0.125)
        assert torch.equal(alone[0], together[i])


# Prompt chunks on the row kernel: rows of one chunk go through the 8-lane loop several at a time, sharing key
# and value loads; each row's arithmetic must stay that of the row alone. Group sizes 1 to 8 (2 x 3 and 2 x 6
# query vectors pair up for the values, 7 and 8 do not), both specialised head sizes, blocks shorter than a
# group of keys, and every cache type float32 queries meet.
ROW_TILE_TYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.int8),
                  (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("q_dtype,kv_dtype", ROW_TILE_TYPES, ids=["float32", "float32-over-bf16",
                                                                   "float32-over-int8", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16), (8, 8, 64, 16), (8, 2, 128, 8), (12, 2, 64, 16), (14, 2, 64, 4), (16, 2, 128, 16)])
def test_each_instruction_set_attends_prompt_rows_as_each_row_alone(isa, q_dtype, kv_dtype, heads, kv_heads,
                                                                    head_dim, block_size):
    """Every row of a step holding several prompt chunks (fresh, and after a cached prefix) is bit-identical to
    that row attended alone, so how a prompt is chunked and batched never changes its text; and within the
    float32 bound of test_each_instruction_set_matches_the_reference of float64 over the cache as stored."""
    chunks = [(0, 1), (0, 11), (37, 50), (5, 3), (64, 33), (0, 130)]
    q, cache, tables, lens, _ = chunk_case(heads, kv_heads, head_dim, block_size, chunks, seed=head_dim + heads,
                                           kv_dtype=torch.float32)
    q = q.to(q_dtype)
    cache = quantize_rows(cache) if kv_dtype == torch.int8 else cache.to(kv_dtype)
    together = native.paged_attention(q, cache, tables, lens, head_dim ** -0.5)
    for i in range(q.shape[0]):
        alone = native.paged_attention(q[i: i + 1], cache, tables[i: i + 1], lens[i: i + 1], head_dim ** -0.5)
        assert torch.equal(alone[0], together[i]), f"row {i}"
    want = reference(q, widened(cache), tables, lens.tolist(), head_dim ** -0.5)
    tol = 2e-6 if q_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(together.double(), want, atol=tol, rtol=tol)


def float32_bits(*words):
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("head_dim", [64, 12])  # 12: eight elements at a time, then four one at a time
def test_each_instruction_set_rounds_float32_kv_into_bfloat16_as_torch(isa, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    cache = torch.randn(2, 3, 30, 16, head_dim, generator=gen).to(torch.bfloat16)
    want = cache.clone()
    qkv = torch.randn(300, 15, head_dim, generator=gen)
    special = float32_bits(
        0x3F808000, 0x3F818000, 0xBF808000,  # ties: to the even neighbour (1.0, 1.0 + 2^-6, -1.0)
        0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF,  # just above a tie; the largest floats round to +-inf
        0x00000001, 0x807FFFFF, 0x00408000,  # denormals: rounded, not flushed to zero
        0x7F800000, 0xFF800000, 0x80000000,  # +-inf, -0
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF)  # NaNs: quiet, negative, signalling, full payload
    flat = qkv.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:2000]] = special.repeat(125)
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.randperm(480, generator=gen)[:300]  # scattered; over 256 rows: the threaded copy
    for j, x in enumerate((k, v)):
        view = want[j].view(3, -1, head_dim)
        view.index_copy_(1, slots, x.transpose(0, 1).to(torch.bfloat16))
    native.write_kv(cache, slots, k, v)
    # Bit for bit, but for NaN: torch's own NaN bits depend on the loop ATen picks (0xffff vectorized, 0x7fc0
    # scalar, as under ATEN_CPU_CAPABILITY=default); ours are the scalar cast's canonical quiet NaN everywhere.
    nan = want.isnan()
    assert torch.equal(cache.isnan(), nan)
    assert torch.equal(cache.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert (cache.view(torch.int16)[nan] == 0x7FC0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_instruction_set_matches_transformers_elementwise(isa, dtype):
    """add_rms_norm and silu_mul on each build, at widths with a remainder past the last eight elements."""
    gen = torch.Generator().manual_seed(2)
    n, inter = 580, 1540
    x, delta = (torch.randn(9, n, generator=gen).to(dtype) for _ in range(2))
    weight = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    fused = x.clone()
    h = native.add_rms_norm(fused, delta, weight, 1e-5)
    assert torch.equal(fused, x + delta)
    check = (lambda a, b: same_bf16(a, b, n)) if dtype == torch.bfloat16 else (
        lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5))
    assert check(h, hf_rms_norm(x + delta, weight, 1e-5))
    assert check(native.add_rms_norm(x.clone(), None, weight, 1e-5), hf_rms_norm(x, weight, 1e-5))
    gate_up = 4 * torch.randn(9, 2 * inter, generator=gen).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    check = same_bf16 if dtype == torch.bfloat16 else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5))
    assert check(native.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_instruction_set_keeps_special_values_through_the_elementwise_ops(isa, dtype):
    """NaN stays NaN and +inf stays +inf through the residual add, the norm's row and SiLU; a subnormal (under
    2^-126) is itself or a zero of its sign (the AVX512-BF16 loop rounds to bfloat16 by VCVTNEPS2BF16, which
    reads subnormals as zero: no activation is that small); SiLU of a large negative input is a (near) zero."""
    nan, inf, tiny = float("nan"), float("inf"), 2.0 ** -130
    special = torch.tensor([nan, inf, tiny, -tiny, -100.0, 2.0, -3.0, 0.5] * 6).to(dtype).reshape(1, -1)  # 48 wide
    x = special.clone()
    h = native.add_rms_norm(x, torch.zeros_like(x), torch.ones(48, dtype=dtype), 1e-5)
    is_nan, is_tiny = special.isnan(), (special != 0) & (special.abs() < 2.0 ** -126)
    assert torch.equal(x.isnan(), is_nan) and h.isnan().all()  # a NaN in a row makes its norm NaN
    assert torch.equal(x[~is_nan & ~is_tiny], special[~is_nan & ~is_tiny])
    assert ((x[is_tiny] == special[is_tiny]) | (x[is_tiny] == 0)).all()
    assert torch.equal(x[is_tiny].signbit(), special[is_tiny].signbit())
    out = native.silu_mul(torch.cat([special, torch.ones_like(special)], dim=-1)).float()[0]
    want = torch.nn.functional.silu(special.float()[0])
    assert torch.equal(out.isnan(), want.isnan()) and (out[special[0] == inf] == inf).all()
    assert (out[is_tiny[0]].abs() <= 2.0 ** -126).all() and (out[special[0] == -100].abs() <= 1e-30).all()
    finite = want.isfinite() & ~is_tiny[0] & (special[0] != -100)
    assert torch.allclose(out[finite], want[finite], rtol=2 ** -7, atol=0)


def same_bf16(a, b, n=576):
    """bfloat16 results as close to the reference's as bfloat16 allows, on any instruction set.

    Both sides compute each value in float32 and round it to bfloat16 twice (the normalised row or the SiLU,
    then the product), but in another order (a sum of n squares, our exp against torch's): the float32 values
    differ by up to n float32 roundings, n * 2^-24 of their size. A value that close to a bfloat16 rounding
    boundary (ulps are 2^-8..2^-7 of the size) rounds the other way: one ulp at the first rounding, which the
    second can carry to two ulps of the output. So: every element within 2 * 2^-7 of its size, and flips in
    at most the share of values that lie that close to a boundary, n * 2^-24 / 2^-8 (0.9 % for n = 576).
    Which values flip, and how many under that bound, depends on the instruction set's summation order."""
    differ = a != b
    size = b.float().abs().clamp_min(2.0 ** -126)
    return (differ.float().mean() <= n * 2.0 ** -24 / 2.0 ** -8
            and bool(((a.float() - b.float()).abs() <= 2 * 2.0 ** -7 * size)[differ].all()))


def hf_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm, rounding included: float32 statistics, the normalised row cast back first."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_add_rms_norm_and_silu_mul_match_transformers(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x, delta = (torch.randn(rows, 576, generator=gen).to(dtype) for _ in range(2))
    weight = (torch.rand(576, generator=gen) + 0.5).to(dtype)
    fused = x.clone()
    h = native.add_rms_norm(fused, delta, weight, 1e-5)
    assert torch.equal(fused, x + delta)  # the residual stream, updated in place
    check = same_bf16 if dtype == torch.bfloat16 else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5))
    assert check(h, hf_rms_norm(x + delta, weight, 1e-5))
    assert check(native.add_rms_norm(x.clone(), None, weight, 1e-5), hf_rms_norm(x, weight, 1e-5))
    gate_up = 4 * torch.randn(rows, 2 * 1536, generator=gen).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert check(native.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


def test_model_gives_the_same_logits_with_and_without_native_elementwise_ops(tiny_runner):
    ids = tiny_runner.tokenizer("the native and the plain PyTorch paths agree")["input_ids"]
    model = tiny_runner.model
    assert model.ops.native
    with_native = our_logits(tiny_runner, ids)
    model.ops.native = False
    try:
        plain = our_logits(tiny_runner, ids)
    finally:
        model.ops.native = True
    torch.testing.assert_close(with_native, plain, rtol=1e-5, atol=1e-5)


def test_a_header_included_from_another_folder_is_part_of_the_cache_key(monkeypatch, tmp_path):
    """A source that #includes a header by a relative path outside its own folder (benchmarks/csrc/gemv_bf16.cpp
    uses the model's bf16.h) gets a new library when that header changes, as when a header beside it does."""
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_compile", lambda cxx, flags, source, out: out.write_bytes(b"built"))
    (tmp_path / "inc").mkdir()
    (tmp_path / "src").mkdir()
    header, source = tmp_path / "inc" / "x.h", tmp_path / "src" / "k.cpp"
    header.write_text("inline int x() { return 1; }\n")
    source.write_text('#include "../inc/x.h"\nextern "C" int k() { return x(); }\n')
    cxx = native._compiler()  # present: the module's fixture skips otherwise
    first = native._build(cxx, "native", source)
    assert native._build(cxx, "native", source) == first  # unchanged: the cached one
    header.write_text("inline int x() { return 2; }\n")
    assert native._build(cxx, "native", source) != first


@pytest.mark.first_pass_only  # the cache's rebuild rule does not depend on the loop; a build costs ~24 s
def test_a_corrupt_cached_library_is_rebuilt(monkeypatch, tmp_path):
    """A cached library that does not load is deleted and built again. The compile is replaced by a copy of the
    library this process built already (the same bytes a compile gives; a real compile takes ~20 s and every
    fresh cache, CI's included, runs one)."""
    good = native._build(native._compiler(), native.requested_isa())  # this build's cache key (built already)
    compiles = []

    def compile_by_copy(cxx, flags, source, out):
        compiles.append(out)
        shutil.copyfile(good, out)

    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path))
    native.reload()
    try:
        built = tmp_path / "kernels" / good.name
        built.parent.mkdir()
        built.write_bytes(b"")                     # as a crash mid-write could leave it
        monkeypatch.setattr(native, "_compile", compile_by_copy)
        assert native.library() is not None and built.stat().st_size == good.stat().st_size
        assert len(compiles) == 1                  # rebuilt once, not on every call
        assert native.library() is not None and len(compiles) == 1
    finally:
        monkeypatch.undo()
        native.reload()


def test_inputs_the_kernels_cannot_read_are_refused():
    q, cache, tables, ctx = random_case(9, 3, 64, 16, [5, 9], torch.float32, seed=5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native.paged_attention(q.half(), cache.half(), tables, ctx, 0.125)
    with pytest.raises(ValueError, match="int32 table row"):
        native.paged_attention(q, cache, tables.long(), ctx, 0.125)
    with pytest.raises(ValueError, match="one int32 table row and context length per query row"):
        native.paged_attention(q, cache, tables[:1], ctx, 0.125)
    with pytest.raises(ValueError, match="weight of its last dimension"):
        native.add_rms_norm(torch.randn(4, 8), None, torch.ones(7), 1e-5)
    slots, cs = torch.arange(2), torch.ones(2, 1, 512)
    with pytest.raises(ValueError, match="even head_dim within the kernels' limit"):  # the kernel's row buffer
        native.rope_write_kv(torch.zeros(2, 15, 512), 9, cs, cs, torch.zeros(2, 3, 4, 16, 512), slots)
    with pytest.raises(ValueError, match="cos and sine"):
        native.rope_write_kv(torch.zeros(2, 15, 64), 9, cs[..., :64].bfloat16(), cs[..., :64].bfloat16(),
                             torch.zeros(2, 3, 4, 16, 64), slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 49152), (7, 33), (128, 1000)])
def test_each_instruction_set_argmax_is_torchs(isa, rows, vocab, dtype):
    """The first maximum of each row, as torch.argmax of the float32 rows: on random rows (in bfloat16 full of
    exact ties, 8 significant bits), on rows of ties (small integers), and on strided rows (a view of wider
    logits)."""
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab + 3, generator=g)[:, 1:vocab + 1].to(dtype)
    ties = torch.randint(0, 3, (rows, vocab), generator=g).to(dtype)
    for case in (x, ties, x.contiguous()):
        assert torch.equal(native.argmax(case), case.float().argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_instruction_set_argmax_special_values(isa, dtype):
    """NaN counts above everything (the first NaN wins, as in torch), +inf above any number, and a row of -inf
    gives index 0."""
    x = torch.randn(5, 100)
    x[0, [50, 70]] = float("nan")
    x[1] = float("-inf")
    x[2, 10] = x[2, 20] = float("inf")
    x[3, 99] = float("nan")
    x[4] = 7.0
    x = x.to(dtype)
    assert torch.equal(native.argmax(x), x.float().argmax(-1))
    assert native.argmax(x).tolist() == [50, 0, 10, 99, 0]


def test_argmax_refuses_what_it_cannot_read():
    for bad in (torch.zeros(2, 3, dtype=torch.float16), torch.zeros(3), torch.zeros(2, 0), torch.zeros(3, 2).t()):
        with pytest.raises(ValueError):
            native.argmax(bad)


# --- the tiled prompt kernel (csrc/prefill_attention.cpp): bfloat16 on AVX512-BF16 ---------------------------

def tiled_here(heads=9, kv_heads=3, head_dim=64) -> bool:
    here = native.prefill_supported(torch.bfloat16, torch.bfloat16, heads, kv_heads, head_dim)
    assert native.prefill_supported(torch.bfloat16, torch.int8, heads, kv_heads, head_dim) == here
    return here


def test_tiled_kernel_builds_where_the_cpu_has_avx512_bf16(isa):
    """The tiled loop is the AVX512-BF16 build's; every other build says so and leaves prompts to the row
    kernel (which the tests above cover on every loop)."""
    assert tiled_here() == (native.isa() == "avx512-bf16")
    assert not native.prefill_supported(torch.float32, torch.float32, 9, 3, 64)
    assert not native.prefill_supported(torch.float32, torch.bfloat16, 9, 3, 64)
    assert not native.prefill_supported(torch.float32, torch.int8, 9, 3, 64)


def chunk_case(heads, kv_heads, head_dim, block_size, chunks, seed, kv_dtype=torch.bfloat16):
    """Prompt chunks (first position, rows) of separate sequences, their rows stacked as a step has them, with
    one table and context length per row; the cache in kv_dtype (int8: rows quantized)."""
    q, cache, tables, _ = random_case(heads, kv_heads, head_dim, block_size, [p + n for p, n in chunks],
                                      torch.float32, seed)
    cache = quantize_rows(cache) if kv_dtype == torch.int8 else cache.to(kv_dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = sum(n for _, n in chunks)
    q = torch.randn(rows, heads + kv_heads, head_dim, generator=gen).bfloat16()[:, :heads]
    seq = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor([n for _, n in chunks]))
    lens = torch.cat([torch.arange(p + 1, p + n + 1) for p, n in chunks]).int()
    firsts = torch.tensor([sum(n for _, n in chunks[:i]) for i in range(len(chunks))])
    spec = torch.tensor([[f, n, p] for f, (p, n) in zip(firsts.tolist(), chunks)], dtype=torch.int32)
    return q, cache, tables[seq].contiguous(), lens, spec


def tiled(q, cache, tables, spec, scale, loop=None):
    out = torch.full(q.shape, 7.0, dtype=torch.bfloat16)
    native.prefill_attention(q, cache, tables, spec, scale, out, loop)
    return out


# A bfloat16 cache's prompt chunks run on AMX tiles where the CPU has them, on VDPBF16PS dot products
# elsewhere; both are tested wherever they run (an int8 cache has the dot-product loop alone).
LOOPS = [("bf16-cache", torch.bfloat16, "amx"), ("bf16-cache", torch.bfloat16, "avx512-bf16"),
         ("int8-cache", torch.int8, "avx512-bf16")]


@pytest.fixture(params=LOOPS, ids=[f"{name}-{loop}" for name, _, loop in LOOPS])
def cache_loop(request):
    """(kv cache dtype, tiled loop), skipped where this CPU does not run that loop."""
    _, kv_dtype, loop = request.param
    if loop not in native.prefill_loops(kv_dtype):
        pytest.skip(f"the tiled kernel's {loop} loop does not run on this CPU")
    return kv_dtype, loop


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16), (9, 3, 64, 1), (8, 2, 128, 8), (4, 4, 64, 32), (16, 1, 64, 16), (32, 2, 128, 16)])
def test_tiled_kernel_matches_reference(heads, kv_heads, head_dim, block_size, cache_loop):
    """Fresh prompts of lengths around the 64-key tile and the row tiles, and chunks after a cached prefix,
    several sequences in one call, against float64 over the cache as stored (an int8 one dequantized). The
    bound is bfloat16's: the output's own rounding (2^-9 of its magnitude) plus the softmax weights' rounding to
    bfloat16 for the second product (2^-9 relative each; the output moves by at most 2^-8 of the values'
    largest magnitude). An int8 cache adds no term: its scores are exact integer sums but for the query's int16
    form (2^-14 of its largest element, far under the rest), its values exact in bfloat16, and each value
    row's scale rides in its weight before the weight's one rounding. The AMX loop's products are the same
    pairs of bfloat16 values summed in float32, in another order."""
    kv_dtype, loop = cache_loop
    if not tiled_here(heads, kv_heads, head_dim):
        pytest.skip("the tiled kernel runs on AVX512-BF16 only")
    chunks = [(0, 1), (0, 2), (0, 63), (0, 65), (0, 130), (37, 50), (100, 1), (64, 64), (5, 200)]
    q, cache, tables, lens, spec = chunk_case(heads, kv_heads, head_dim, block_size, chunks, seed=head_dim,
                                              kv_dtype=kv_dtype)
    out = tiled(q, cache, tables, spec, head_dim ** -0.5, loop)
    stored = widened(cache)
    want = reference(q, stored, tables, lens.tolist(), head_dim ** -0.5)
    v_max = stored[1].double().abs().max()
    assert ((out.double() - want).abs() <= want.abs() * 2.0 ** -8 + v_max * 2.0 ** -8).all()


def test_tiled_rows_do_not_depend_on_chunking_or_companions(cache_loop):
    """A row's output is bit-identical however its prompt is cut into chunks and whatever else the call holds:
    key tiles start at position 0 of the sequence, whatever the chunk, and tasks never mix sequences (on AMX a
    row's sums do not depend on the other rows of its 16-row block either)."""
    kv_dtype, loop = cache_loop
    if not tiled_here():
        pytest.skip("the tiled kernel runs on AVX512-BF16 only")
    q, cache, tables, lens, spec = chunk_case(9, 3, 64, 16, [(0, 300), (0, 90)], seed=11, kv_dtype=kv_dtype)
    whole = tiled(q, cache, tables, spec, 0.125, loop)
    for cuts in ([(0, 100), (100, 200)], [(0, 1), (1, 298), (299, 1)], [(0, 64), (64, 64), (128, 172)]):
        for p, n in cuts:
            part = tiled(q[p:p + n], cache, tables[p:p + n], torch.tensor([[0, n, p]], dtype=torch.int32), 0.125,
                         loop)
            assert torch.equal(part, whole[p:p + n])
    alone = tiled(q[300:], cache, tables[300:], torch.tensor([[0, 90, 0]], dtype=torch.int32), 0.125, loop)
    assert torch.equal(alone, whole[300:])


def test_tiled_kernel_leaves_other_rows_alone_and_refuses_what_it_cannot_read():
    if not tiled_here():
        pytest.skip("the tiled kernel runs on AVX512-BF16 only")
    q, cache, tables, lens, spec = chunk_case(9, 3, 64, 16, [(0, 20)], seed=2)
    out = tiled(q, cache, tables, torch.tensor([[5, 10, 5]], dtype=torch.int32), 0.125)
    assert (out[:5] == 7).all() and (out[15:] == 7).all() and not (out[5:15] == 7).all()
    for bad in (torch.tensor([[15, 10, 0]], dtype=torch.int32), torch.tensor([[0, 0, 0]], dtype=torch.int32),
                torch.tensor([[0, 5, -1]], dtype=torch.int32), spec.long()):
        with pytest.raises(ValueError):
            tiled(q, cache, tables, bad, 0.125)
    with pytest.raises(ValueError):
        native.prefill_attention(q.float(), cache, tables, spec, 0.125, torch.empty(q.shape))
