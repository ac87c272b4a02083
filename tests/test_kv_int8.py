"""The 8-bit KV cache (--kv-cache-dtype int8): rows quantized as written, by the native kernel and by PyTorch to
the same bits; attention over them on every loop this CPU runs, against float64; the PyTorch path against the
native one; the flag through RunnerConfig and the CLI; the block budget; a tiny model end to end.

Two kinds of bound below. Against the cache as stored (each value q * scale, exact in float64) the kernel's
only errors are its float32 sums and the output's rounding: the float32 and bfloat16 bounds of test_native.
Against the keys and values before they were stored, the error is the quantization's: each value moves by at
most half a quantization step (scale / 2), and the bound on the output follows from that alone (see
`quantization_bound`)."""
import math
import os
import random

import pytest
import torch

from jitney.cli import build_parser
from batcher.config import BatcherConfig
from batcher.engine import Engine
from benchmarks.steps import held
from model_runner import attention, native
from model_runner.attention import write_kv
from model_runner.config import ModelConfig, RunnerConfig
from model_runner.errors import ModelLoadError
from model_runner.int8_kv import as_stored, dequantize_rows, quantize_rows, row_scales
from model_runner.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block, plan_num_blocks
from model_runner.precision import resolve_precision
from model_runner.runner import ModelRunner
from sim.cost import Work

from .reference import PROMPTS, our_greedy, our_logits, relative_error, runner_kv
from .test_native import isa, random_case, reference  # noqa: F401 (isa: a fixture, every loop this CPU runs)

Q_TYPES = [torch.float32, torch.bfloat16]
Q_IDS = ["float32", "bf16"]
# Half a step, and a little more: x / scale is taken as x * (1 / scale), each rounded to float32 (2^-24 relative)
# before the result, up to 127, is rounded to an integer, and the scale absmax / 127 is itself rounded: a few
# float32 roundings of 127, each 127 * 2^-24 < 2^-17 of a step; 2^-12 leaves room to spare.
HALF_STEP = 0.5 + 2.0 ** -12


@pytest.fixture
def needs_native():
    """The kernels' own tests: skipped where jitney runs the PyTorch path (no compiler, JITNEY_NATIVE=0), which the
    other tests here still check; with a compiler the kernels must build (the isa fixture asserts it)."""
    if native._compiler() is None or os.environ.get("JITNEY_NATIVE") == "0":
        pytest.skip("no C++ compiler here, or JITNEY_NATIVE=0: jitney runs the PyTorch path")


def int8_case(heads, kv_heads, head_dim, block_size, lens, q_dtype, seed):
    """random_case with its cache quantized: (q, the cache's float values, the int8 cache, tables, lens)."""
    q, cache, tables, ctx = random_case(heads, kv_heads, head_dim, block_size, lens, torch.float32, seed)
    return q.to(q_dtype), cache, quantize_rows(cache), tables, ctx


def quantization_bound(q, cache, q8, tables, lens, scale):
    """The largest error each output element can take from quantizing keys and values, half a step each.

    A key's value off by at most s_k / 2 (s_k its row's scale) moves its score q.k * scale by at most
    delta = scale * sum|q| * max s_k / 2; with every score off by at most delta, every softmax weight p_t
    changes by a factor within [e^-2delta, e^2delta], so by at most p_t (e^2delta - 1); and as the weights sum to
    1 before and after, the output o = sum p_t v_t moves by at most sum |p'_t - p_t| |v_t - o|, that is
    (e^2delta - 1) times the weighted mean distance of the values from the output. The values themselves are off
    by at most s_v / 2, which weights summing to 1 pass on unchanged."""
    _, kvh, _, bs, d = cache.shape
    scales = row_scales(q8)[..., 0].double()  # [2, kvh, blocks, bs]
    bound = torch.empty(q.shape, dtype=torch.float64)
    for i, n in enumerate(lens):
        blocks = tables[i, : -(-n // bs)].long()
        k, v = (cache[j][:, blocks].reshape(kvh, -1, d)[:, :n].double() for j in (0, 1))
        sk, sv = (scales[j][:, blocks].reshape(kvh, -1)[:, :n] for j in (0, 1))
        qi = q[i].double().view(kvh, -1, d)                                         # [kvh, group, d]
        p = torch.softmax(qi @ k.transpose(-1, -2) * scale, -1)                      # [kvh, group, n]
        o = p @ v
        spread = (p[..., None] * (v[:, None] - o[:, :, None]).abs()).sum(2)         # [kvh, group, d]
        delta = scale * qi.abs().sum(-1, keepdim=True) * sk.amax(-1)[:, None, None] * HALF_STEP
        bound[i] = ((torch.exp(2 * delta) - 1) * spread + sv.amax(-1)[:, None, None] * HALF_STEP).reshape(-1, d)
    return bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_come_back_within_half_a_step_and_keep_their_extremes(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 3, 64, generator=gen) * torch.rand(50, 3, 1, generator=gen) * 8).to(dtype)
    x[7, 1] = 0  # a row of zeros: scale 0, values 0, back exactly
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 68)
    scale = row_scales(rows)
    torch.testing.assert_close(scale, x.float().abs().amax(-1, keepdim=True) / 127, rtol=0, atol=0)
    back = dequantize_rows(rows)
    assert ((back - x.float()).abs() <= scale * HALF_STEP).all()
    assert (rows[..., :64].abs().amax(-1)[scale[..., 0] > 0] == 127).all()  # each row's largest value is +-127
    assert (back[7, 1] == 0).all() and scale[7, 1] == 0
    assert torch.equal(as_stored(x, torch.int8), back)


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_each_instruction_set_writes_the_bits_pytorch_writes(needs_native, isa, src):
    """native.write_kv into an int8 cache: the same bytes as the PyTorch path's write (values and scales), at
    scattered slots (over 256 rows: the threaded copy), from strided k, v views; other slots untouched."""
    gen = torch.Generator().manual_seed(4)
    cache = quantize_rows(torch.randn(2, 3, 30, 16, 64, generator=gen))
    want = cache.clone()
    qkv = (torch.randn(300, 15, 64, generator=gen) * 3).to(src)
    qkv[5, 9] = 0  # a key row of zeros
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.randperm(480, generator=gen)[:300]
    write_kv(want[0], slots, k)
    write_kv(want[1], slots, v)
    native.write_kv(cache, slots, k, v)
    assert torch.equal(cache, want)
    stored = cache.view(2, 3, -1, 68)[:, :, slots]                  # [2, kvh, 300, 68]
    back = dequantize_rows(stored)
    orig = torch.stack([k, v]).transpose(1, 2).float()              # [2, kvh, 300, 64]
    assert ((back - orig).abs() <= row_scales(stored) * HALF_STEP).all()


SHAPES = [
    (9, 3, 64, 16),   # SmolLM2's shape
    (8, 2, 128, 8),   # Llama's head size; blocks shorter than a group of keys
    (6, 3, 48, 8),    # a head size with no specialised loop
    (16, 1, 64, 16),  # 16 query heads per kv head: the portable loop everywhere
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
@pytest.mark.parametrize("q_dtype", Q_TYPES, ids=Q_IDS)
def test_each_instruction_set_matches_the_reference_over_the_stored_values(needs_native, isa, heads, kv_heads,
                                                                           head_dim, block_size, q_dtype):
    """Against float64 attention over the values the cache holds (q * scale, exact in float64): the int8 rows are
    widened exactly, so only the kernel's float32 sums and the output's rounding remain, the bounds of the
    float32 and bfloat16 caches (test_native: 2e-6 for float32 output, 2^-9 relative rounding of values up to
    ~2 for bfloat16)."""
    rng = random.Random(head_dim)
    lens = [1, 7, block_size, block_size + 1, 3 * block_size - 1] + [rng.randrange(1, 300) for _ in range(5)]
    q, _, q8, tables, ctx = int8_case(heads, kv_heads, head_dim, block_size, lens, q_dtype, seed=7)
    assert native.supported("cpu", q_dtype, heads, kv_heads, head_dim, block_size, torch.int8)
    out = native.paged_attention(q, q8, tables, ctx, head_dim ** -0.5)
    want = reference(q, dequantize_rows(q8), tables, lens, head_dim ** -0.5)
    tol = 2e-6 if q_dtype == torch.float32 else 8e-3
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES[:2])
def test_each_instruction_set_error_is_the_quantizations(needs_native, isa, heads, kv_heads, head_dim, block_size):
    """Against float64 attention over the keys and values before quantizing: within `quantization_bound`, the
    error half a step per element can cause, everywhere (float32 queries; plus the float32 sums' 2e-6)."""
    lens = [1, 2, 9, 40, 160, 299]
    q, cache, q8, tables, ctx = int8_case(heads, kv_heads, head_dim, block_size, lens, torch.float32, seed=11)
    scale = head_dim ** -0.5
    out = native.paged_attention(q, q8, tables, ctx, scale).double()
    want = reference(q, cache, tables, lens, scale)
    bound = quantization_bound(q, cache, q8, tables, lens, scale)
    err = (out - want).abs()
    assert (err <= bound + 2e-6).all()
    assert err.max() > 1e-4  # the quantization is there (a float cache would be within 2e-6)
    assert bound.max() < 0.6  # and the bound says something about outputs of magnitude ~1 (0.35, 0.49 here)


@pytest.mark.parametrize("q_dtype", Q_TYPES, ids=Q_IDS)
def test_each_instruction_set_prompt_rows_attend_causally_through_one_shared_table(needs_native, isa, q_dtype):
    start, n = 37, 50
    q, _, q8, tables, _ = int8_case(9, 3, 64, 16, [start + n], q_dtype, seed=3)
    q = torch.randn(n, 12, 64).to(q_dtype)[:, :9]
    ctx = torch.arange(start + 1, start + n + 1, dtype=torch.int32)
    out = native.paged_attention(q, q8, tables.expand(n, -1), ctx, 0.125)
    want = reference(q, dequantize_rows(q8), tables.expand(n, -1), ctx.tolist(), 0.125)
    tol = 2e-6 if q_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("q_dtype", Q_TYPES, ids=Q_IDS)
def test_each_instruction_set_keeps_int8_sequences_independent_of_their_batch(needs_native, isa, q_dtype):
    """Batch invariance at the kernel: a sequence's output is bit-identical alone and among others."""
    q, _, q8, tables, ctx = int8_case(9, 3, 64, 16, [5, 70, 300, 17], q_dtype, seed=1)
    together = native.paged_attention(q, q8, tables, ctx, 0.125)
    for i in range(4):
        alone = native.paged_attention(q[i: i + 1], q8, tables[i: i + 1], ctx[i: i + 1], 0.125)
        assert torch.equal(alone[0], together[i])


# --- the flag, the budget, the runner -------------------------------------------------------------------------

@pytest.mark.parametrize("compute", ["float32", "bfloat16", "auto"])
def test_int8_is_asked_for_by_name_under_either_compute_dtype(compute):
    p = resolve_precision(compute, "int8", "cpu")
    assert p.kv_cache == torch.int8 and p.compute in (torch.float32, torch.bfloat16)
    assert ", int8 KV cache" in p.describe() and "--kv-cache-dtype int8" in p.describe()
    assert build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    assert build_parser().parse_args(["generate", "--prompt", "x", "--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"


@pytest.mark.parametrize("compute,device,what", [("float16", "cpu", "float16 is for CUDA"),
                                                 ("bfloat16", "cuda", "on cuda use --kv-cache-dtype auto")])
def test_int8_is_refused_where_it_does_not_run_with_what_to_do(compute, device, what):
    with pytest.raises(ModelLoadError, match=what):
        resolve_precision(compute, "int8", device)


def test_the_block_budget_counts_the_scales():
    """SmolLM2's shape: 30 layers x 2 x 3 kv heads x 16 tokens per block, rows of 64 + 4 bytes against 128."""
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=1e5, rope_scaling=None, max_position_embeddings=8192, tie_word_embeddings=True,
                      attention_bias=False, eos_token_ids=(2,))
    rows = 30 * 2 * 3 * 16
    assert kv_cache_bytes_per_block(cfg, 16, torch.int8) == rows * 68
    assert kv_cache_bytes_per_block(cfg, 16, torch.bfloat16) == rows * 128
    budget = 1 << 30
    assert plan_num_blocks(cfg, 16, torch.int8, "cpu", budget, 0.0) == budget // (rows * 68)
    cache = allocate_kv_cache(cfg, 3, 16, torch.int8, "cpu")
    assert cache.shape == (30, 2, 3, 3, 16, 68) and cache.nbytes == 3 * rows * 68
    # The simulator's cost model counts the same bytes (jitney simulate --kv-cache-dtype int8).
    assert Work(cfg, "bfloat16", "int8").kv_bytes_per_token * 16 == rows * 68


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def int8_runner(request):
    runner = ModelRunner(RunnerConfig(model="tiny-random", dtype=request.param, kv_cache_dtype="int8",
                                      kv_cache_memory=8 << 20), progress=False)
    return runner


def test_the_runner_allocates_and_describes_an_int8_cache(int8_runner):
    r = int8_runner
    assert r.kv_cache.dtype == torch.int8 and r.kv_cache.shape[-1] == r.model_config.head_dim + 4
    assert r.kv_cache.nbytes == r.kv_cache_bytes <= 8 << 20
    assert ", int8 KV cache" in r.describe()  # the start-up line, and /v1/models' description
    cache_info = Engine(r, BatcherConfig()).config_info()["cache"]  # /metrics' jitney_cache_config_info
    assert cache_info["cache_dtype"] == "int8" and cache_info["kv_cache_bytes"] == str(r.kv_cache.nbytes)


def test_the_pytorch_path_matches_the_native_one(int8_runner):
    """One layer of a mixed step (three decodes, a prompt chunk after a cached prefix, a fresh prompt) over the
    same int8 cache, by attention.paged_attention's two paths: both write the step's keys and values to the
    same bits (tested above), and read the same rows, so they differ by their float sums alone under float32
    compute (1e-5; 5e-7 measured), and by bfloat16's rounding under bfloat16, where the PyTorch path rounds the
    widened keys and values to bfloat16 and multiplies in bfloat16 while the kernel sums in float32 (2^-6 plus
    2^-6 of the value: a bfloat16 ulp or two of outputs up to ~2.7; one ulp, 2^-6, measured).

    Whole models are not compared: where a later layer's key lands within float32 rounding of a quantization
    boundary, the two paths' last-bit differences round it to neighbouring int8 steps, and the logits then
    differ by a step's effect, not by rounding (5e-4 of their range, seen on tiny-random)."""
    r = int8_runner
    if not r.native_kernels[0]:
        pytest.skip("the native kernels did not build here")
    mc = r.model_config
    gen = torch.Generator().manual_seed(9)
    layer = quantize_rows(torch.randn(2, mc.num_key_value_heads, r.num_blocks, r.block_size, mc.head_dim,
                                      generator=gen))
    with held(r, [40, 77, 130, 90, 25], [1, 1, 1, 30, 25]) as plan:
        items = sorted(plan, key=lambda it: (it[1] != 1, it[0].num_computed_tokens))  # as execute orders them
        metas = []
        for native_path in (True, False):
            r.native_attention = native_path
            metas.append(r._prepare(items)[0])
        r.native_attention = True
    rows = sum(n for _, n in items)
    q = torch.randn(rows, mc.num_attention_heads, mc.head_dim, generator=gen).to(r.dtype)
    k, v = (torch.randn(rows, mc.num_key_value_heads, mc.head_dim, generator=gen).to(r.dtype) for _ in range(2))
    caches = [layer.clone(), layer.clone()]
    qkv = torch.cat([q, k, v], dim=1)
    one, zero = (torch.full((rows, 1, mc.head_dim), x, dtype=r.dtype) for x in (1.0, 0.0))
    outs = []
    for c, m in zip(caches, metas):  # each path writes k and v its way (rotated by angle 0: unchanged), then reads
        qs, ks, vs = attention.rotate_and_store(qkv.clone(), mc.num_attention_heads, one, zero, c, m)
        outs.append(attention.paged_attention(qs, ks, vs, c, m, mc.head_dim ** -0.5))
    assert torch.equal(caches[0], caches[1])
    tol = 1e-5 if r.dtype == torch.float32 else 2.0 ** -6
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_int8_greedy_text_is_the_same_alone_and_batched_and_frees_every_block(int8_runner, path):
    r = int8_runner
    if path == "native" and not r.native_kernels[0]:
        pytest.skip("the native kernels did not build here")
    r.native_attention = path == "native"
    try:
        prompts = [r.tokenizer(p)["input_ids"] for p in PROMPTS]
        batched = our_greedy(r, prompts, 40)
        assert batched == [our_greedy(r, [p], 40)[0] for p in prompts]
        assert runner_kv(r).num_free == r.num_blocks
    finally:
        r.native_attention = r.native_kernels[0]


def test_int8_logits_stay_near_the_float_caches():
    """tiny-random (head size 16: 17 steps of a row's largest value per element) under float32 compute: int8
    keys and values move the logits by a few percent of their range at most (2.9e-2 measured), where the float32
    cache is the reference; a sanity bound, the quality figures on the real model are docs/quantization.md's."""
    ref = ModelRunner(RunnerConfig(model="tiny-random", dtype="float32", kv_cache_memory=8 << 20), progress=False)
    q8 = ModelRunner(RunnerConfig(model="tiny-random", dtype="float32", kv_cache_dtype="int8",
                                  kv_cache_memory=8 << 20), progress=False)
    ids = ref.tokenizer("A long enough prompt to cover several KV blocks, " * 6)["input_ids"]
    err = relative_error(our_logits(q8, ids), our_logits(ref, ids))
    assert 0 < err < 0.1
    assert math.isfinite(err)
