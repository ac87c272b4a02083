"""Native CPU kernels (csrc/*.cpp), compiled on first use with the system's C++ compiler and cached.

The kernels have a plain C ABI and include no PyTorch headers, so they build with the compiler alone, once per
CPU and source (about 25 s for paged_attention.cpp on 2 AMD Zen 3 cores, its two units side by side; a few
seconds for the others; no ninja, no PyTorch build environment); they are called through ctypes with tensor
data pointers, which releases the GIL for the call. They link the process's libgomp, the same runtime PyTorch
uses (with g++, the compiler tried first), so both share one pool of threads.

Where no compiler is found or the build fails, jitney says so once and runs the PyTorch path instead, which
gives the same results up to rounding. JITNEY_NATIVE=0 turns the kernels off (to compare, or to rule them out).

Each kernel has an AVX-512 loop, an AVX2 + FMA loop and a portable one; which of them a build holds follows
from the instruction set it is compiled for (the C++ tests the compiler's macros), and that is chosen here:
JITNEY_ISA=native (the default: everything this CPU has), avx2 (x86-64-v3: what an AMD Zen 2/3 or an Intel
client chip runs, also on an AVX-512 machine, so one developer can exercise both paths) or portable (no
intrinsics at all: what an Arm machine runs). `isa()` names the loop a build holds.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from .kv_cache import cache_head_dim
from .paths import cache_dir
from .precision import cpuinfo_flags

log = logging.getLogger("jitney")

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
PREFILL_SOURCE = SOURCE.parent / "prefill_attention.cpp"
# -march=native: the cached library is keyed by this CPU's flags below, so it never runs on another CPU.
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC"]
ISA_FLAGS = {
    "native": ["-march=native"],
    # x86-64-v3 is AVX2 + FMA + F16C + BMI2, what every AVX2 CPU of the last decade has; tuned for this one.
    "avx2": ["-march=x86-64-v3", "-mtune=native"],
    # The compiler may still vectorize the plain loops for this CPU; the intrinsic paths are compiled out.
    "portable": ["-march=native", "-DJITNEY_PORTABLE"],
    # This CPU's AVX-512 loops with the AMX ones compiled out: an Intel Xeon with AMX standing in for an AMD Zen 4
    # (AVX512-BF16 and VNNI, no tiles), with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 for oneDNN.
    "avx512": ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"],
}
# Sources built as several translation units of the same file (each with its own -D), compiled side by side and
# linked: paged_attention.cpp's float32 prompt-row tiles take as long to compile as the rest of it (about 17 s
# each on AMD Zen 3), so a first build takes half as long on two cores.
PARTS = {"paged_attention.cpp": [[], ["-DJITNEY_TILED_PART"]]}
_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# What a cache holds, as the kernels' kv_kind / dst_kind argument says it: int8 rows carry their float32 scale
# after their values (model_runner/kv_cache.py).
KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def _machine() -> str:
    """What -march=native depends on: the machine and its instruction-set flags."""
    return f"{platform.machine()} {' '.join(sorted(cpuinfo_flags()))}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def requested_isa() -> str:
    """The instruction set asked for by JITNEY_ISA (native, avx2, avx512 or portable)."""
    name = os.environ.get("JITNEY_ISA", "native").lower() or "native"
    if name not in ISA_FLAGS:
        raise ValueError(f"JITNEY_ISA={name!r}: choose one of {', '.join(ISA_FLAGS)}")
    if name == "avx2" and not {"avx2", "fma"} <= cpuinfo_flags():
        raise ValueError("JITNEY_ISA=avx2 needs a CPU with AVX2 and FMA; this one has neither (use portable)")
    if name == "avx512" and "avx512f" not in cpuinfo_flags():
        raise ValueError("JITNEY_ISA=avx512 needs a CPU with AVX-512; this one has none (use native)")
    return name


def _build(cxx: str, isa: str, source: Path = SOURCE) -> Path:
    """The shared library for this source, compiler, CPU and instruction set: built once, then reused."""
    flags = FLAGS + ISA_FLAGS[isa]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    # What the source may #include: the headers beside it, and any it names by a relative path elsewhere (a
    # benchmark's kernel using the model's bf16.h), so that an edit to one builds the library again.
    named = {(source.parent / h).resolve() for h in re.findall(r'#include\s+"([^"]+)"', source.read_text())}
    headers = [h.read_text() for h in sorted({h.resolve() for h in source.parent.glob("*.h")} | named)]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, " ".join(flags), version, _machine()]).encode())
    out = cache_dir() / "kernels" / f"{source.stem}-{isa}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: safe under races
        part = Path(tmp) / out.name
        _compile(cxx, flags, source, part)
        os.replace(part, out)
    return out


def _compile(cxx: str, flags: list[str], source: Path, out: Path) -> None:
    """Compiles source into the shared library `out`: in one run, or (PARTS) each unit at once, side by side,
    then linked. Raises RuntimeError with the compiler's complaint."""
    units = PARTS.get(source.name)
    if units is None:
        _run([[cxx, *flags, str(source), "-o", str(out)]])
        return
    objs = [out.with_suffix(f".{i}.o") for i in range(len(units))]
    compile_flags = [f for f in flags if f != "-shared"]
    _run([[cxx, *compile_flags, *unit, "-c", str(source), "-o", str(o)] for unit, o in zip(units, objs)])
    _run([[cxx, "-shared", "-fopenmp", *map(str, objs), "-o", str(out)]])


def _run(commands: list[list[str]], timeout: float = 300) -> None:
    """Runs compiler commands side by side; raises RuntimeError with the first failure's output."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise RuntimeError(f"{commands[0][0]} took over {timeout:.0f} s") from None
    for p, (_, err) in zip(procs, results):
        if p.returncode != 0:
            raise RuntimeError(err.strip()[-2000:])


def _load(cxx: str, isa: str, source: Path = SOURCE) -> ctypes.CDLL:
    """The built library; a cached file that does not load (say, truncated by a crash) is rebuilt once."""
    path = _build(cxx, isa, source)
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(_build(cxx, isa, source)))


def load_source(source: Path, declare, fallback: str) -> ctypes.CDLL | None:
    """One csrc/*.cpp built for JITNEY_ISA and loaded, its C signatures declared by `declare`; None where the
    kernels are turned off, there is no compiler or the build fails (logged: `fallback` says what runs then).
    Callers cache the result (one build and one warning per process)."""
    if os.environ.get("JITNEY_NATIVE", "1") == "0":
        return None
    cxx = _compiler()
    if cxx is None:
        log.warning("no C++ compiler (g++) found: %s; install g++ for the native kernels", fallback)
        return None
    try:
        lib = _load(cxx, requested_isa(), source)
        declare(lib)
    except (OSError, RuntimeError, AttributeError, ValueError) as e:
        log.warning("native kernels failed to build or load (%s, from %s): %s; %s", source.name,
                    cache_dir() / "kernels", e, fallback)
        return None
    return lib


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (turned off, no compiler, or a failed build: logged once)."""
    return load_source(SOURCE, _declare, "using PyTorch attention instead (slower at long contexts)")


@cache
def prefill_library() -> ctypes.CDLL | None:
    """The prompt-chunk kernel (csrc/prefill_attention.cpp), or None; JITNEY_TILED_PREFILL=0 turns it off, so
    that prompt rows take the row kernel (to compare the two)."""
    if os.environ.get("JITNEY_TILED_PREFILL", "1") == "0":
        return None
    return load_source(PREFILL_SOURCE, _declare_prefill, "prompt chunks run on the row kernel instead")


def reload() -> None:
    """Forget the loaded kernels: the next call builds or loads them for the JITNEY_* variables now set."""
    library.cache_clear()
    prefill_library.cache_clear()


def _declare_prefill(lib: ctypes.CDLL) -> None:
    lib.jitney_prefill_supported.argtypes, lib.jitney_prefill_supported.restype = [_i32, _i32, _i32], _i32
    lib.jitney_prefill_amx.argtypes, lib.jitney_prefill_amx.restype = [], _i32
    lib.jitney_prefill_attention.argtypes = [_i32, _i32, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i32, _ptr, _i32, _i32, _i32,
                                             _i64, _i32, ctypes.c_float]
    lib.jitney_prefill_attention.restype = None


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures, so ctypes converts every argument to the width the C side reads."""
    lib.jitney_limits.argtypes, lib.jitney_limits.restype = [_i32], _i32
    lib.jitney_isa.argtypes, lib.jitney_isa.restype = [], ctypes.c_char_p
    lib.jitney_paged_attention.argtypes = [_i32, _i32, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i32, _i32,
                                           _i32, _i64, _i32, ctypes.c_float]
    lib.jitney_paged_attention.restype = None
    lib.jitney_write_kv.argtypes = [_i32, _i32, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i32, _i32, _i64, _i32]
    lib.jitney_write_kv.restype = None
    lib.jitney_rope_write_kv.argtypes = [_i32, _i32, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i32, _i32, _i32,
                                         _i64, _i32]
    lib.jitney_rope_write_kv.restype = None
    lib.jitney_add_rms_norm.argtypes = [_i32, _ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float]
    lib.jitney_add_rms_norm.restype = None
    lib.jitney_silu_mul.argtypes = [_i32, _ptr, _ptr, _i64, _i64]
    lib.jitney_silu_mul.restype = None
    lib.jitney_argmax.argtypes, lib.jitney_argmax.restype = [_i32, _ptr, _i64, _i64, _i64, _ptr], None
    # (largest query heads per kv head, head_dim, block_size) the build takes: read once, not on every call.
    lib.limits = tuple(lib.jitney_limits(i) for i in range(3))


def _check(ok: bool, what: str, *tensors: torch.Tensor) -> None:
    """Raw pointers go to C: refuse anything the kernels do not expect (a plain if, kept under python -O)."""
    if not ok or not all(t.is_cpu for t in tensors):  # is_cpu: a seventh of device.type's cost, per call
        raise ValueError(f"native kernel input: expected {what}, on the CPU; got "
                         + ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in tensors))


def isa() -> str | None:
    """The loop the loaded kernels run: avx512-bf16, avx512, avx2 or portable (None: no kernels)."""
    lib = library()
    return None if lib is None else lib.jitney_isa().decode()


def elementwise_supported(device: str, dtype: torch.dtype) -> bool:
    """Whether add_rms_norm and silu_mul can run natively for this device and dtype."""
    return device == "cpu" and dtype in KERNEL_DTYPES and library() is not None


def supported(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int,
              kv_dtype: torch.dtype | None = None) -> bool:
    """Whether paged attention (and the K/V write) can run natively: compute in `dtype`, a cache in
    `kv_dtype` (the same when None; float32 compute over a bfloat16 cache is the AVX2 machines' case; int8
    under either compute dtype)."""
    ok = device == "cpu" and dtype in KERNEL_DTYPES and (kv_dtype or dtype) in KV_KINDS
    lib = library() if ok else None
    if lib is None or heads % kv_heads:
        return False
    max_group, max_head_dim, max_block = lib.limits
    return heads // kv_heads <= max_group and head_dim <= max_head_dim and block_size <= max_block


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of query rows q [n, H, D] (heads contiguous, any stride between rows) over a layer's cache
    [2, KVH, blocks, block_size, D]: row i attends to the first context_lens[i] tokens (int32, >= 1) of the
    sequence whose blocks are block_tables[i] (int32; rows of one prompt share a table). Returns [n, H, D] in
    q's dtype (into `out` when given: contiguous, of that shape); the cache may be bfloat16 under float32
    queries (widened as read).
    An int8 cache (rows of D + 4 bytes: kv_cache.py) goes under either, widened and scaled as read. Callers
    check `supported`."""
    n, heads, d = q.shape
    _, kv_heads, num_blocks, block_size, _ = kv_cache.shape
    _check(q.dtype in KERNEL_DTYPES and kv_cache.dtype in KV_KINDS and q.stride(2) == 1 and q.stride(1) == d
           and kv_cache.is_contiguous(), "q float32 or bfloat16 with heads contiguous, a contiguous float32, "
           "bfloat16 or int8 cache",
           q, kv_cache)
    _check(block_tables.dtype == context_lens.dtype == torch.int32 and block_tables.stride(1) == 1
           and context_lens.is_contiguous() and block_tables.shape[0] == context_lens.shape[0] == n
           and cache_head_dim(kv_cache) == d, "one int32 table row and context length per query row", block_tables)
    if out is None:
        out = torch.empty(n, heads, d, dtype=q.dtype)
    _check(out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype, "out like q, contiguous", out)
    library().jitney_paged_attention(int(q.dtype == torch.bfloat16), KV_KINDS[kv_cache.dtype],
                                     q.data_ptr(), q.stride(0),
                                     kv_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
                                     context_lens.data_ptr(), out.data_ptr(), n, heads, kv_heads, d, num_blocks,
                                     block_size, scale)
    return out


def prefill_supported(dtype: torch.dtype, kv_dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether prompt chunks of this layer shape and these dtypes run on the tiled kernel: bfloat16 queries over
    a bfloat16 or int8 cache, on a CPU with AVX512-BF16 (elsewhere the row kernel runs them); prefill_loops()
    says which of its loops."""
    lib = prefill_library()
    return (lib is not None and dtype == torch.bfloat16 and kv_dtype in (torch.bfloat16, torch.int8)
            and bool(lib.jitney_prefill_supported(heads, kv_heads, head_dim)))


def prefill_loops(kv_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The tiled kernel's loops over a cache of kv_dtype this build and CPU can run, the fastest first: "amx"
    (both products on the AMX tile units: Intel Xeons since Sapphire Rapids, where Linux grants this process the
    tiles; a bfloat16 cache only) and "avx512-bf16" (VDPBF16PS dot products). Empty without the tiled kernel."""
    loops = _prefill_loops(prefill_library())
    return list(loops if kv_dtype == torch.bfloat16 else loops[-1:])


@cache
def _prefill_loops(lib: ctypes.CDLL | None) -> list[str]:  # per loaded library: asked once, not at every call
    if lib is None or not lib.jitney_prefill_supported(2, 1, 64):
        return []
    return (["amx"] if lib.jitney_prefill_amx() else []) + ["avx512-bf16"]


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, chunks: torch.Tensor,
                      scale: float, out: torch.Tensor, loop: str | None = None) -> None:
    """Attention of prompt chunks, tiled (csrc/prefill_attention.cpp), over a bfloat16 or int8 cache, into out
    [n, H, D] (contiguous, bfloat16): chunks [C, 3] int32 holds each chunk's (first row, rows, position of its first row); a chunk's rows
    are consecutive rows of q [n, H, D] and its sequence's table is block_tables[first row]. Rows outside the
    chunks are left as they are. Callers check `prefill_supported`. loop: one of prefill_loops(kv_cache.dtype)
    (default the first)."""
    n, heads, d = q.shape
    _, kv_heads, num_blocks, block_size, _ = kv_cache.shape
    _check(q.dtype == out.dtype == torch.bfloat16 and kv_cache.dtype in (torch.bfloat16, torch.int8)
           and q.stride(2) == 1 and q.stride(1) == d and kv_cache.is_contiguous() and cache_head_dim(kv_cache) == d
           and out.is_contiguous() and out.shape == q.shape, "bfloat16 q [n, H, D] with heads contiguous, out like "
           "q, a contiguous bfloat16 or int8 cache", q, kv_cache, out)
    _check(block_tables.dtype == chunks.dtype == torch.int32 and block_tables.stride(1) == 1
           and chunks.is_contiguous() and chunks.dim() == 2 and chunks.shape[1] == 3 and block_tables.shape[0] == n
           and all(first >= 0 and rows >= 1 and first + rows <= n and pos >= 0  # a few chunks: plain Python
                   for first, rows, pos in chunks.tolist()),
           "int32 chunks (first row, rows, first position) within the rows, one table per row", chunks)
    loops = prefill_loops(kv_cache.dtype)
    _check(loop in (None, *loops), f"a tiled loop this CPU runs over this cache ({', '.join(loops)})", q)
    prefill_library().jitney_prefill_attention(
        int(kv_cache.dtype == torch.int8), int(loop in (None, "amx")), q.data_ptr(), q.stride(0),
        kv_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0), chunks.data_ptr(), chunks.shape[0],
        out.data_ptr(), heads, kv_heads, d, num_blocks, block_size, scale)


def write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Stores k, v [T, KVH, D] (heads contiguous, any stride between rows) at slots [T] (int64) of a layer's
    cache [2, KVH, blocks, block_size, D]: one pass, where two index_copy_ calls on the strided views took
    7 ms of a 100 ms decode step. (The model's step writes through rope_write_kv, which rotates first and then
    writes each row by the same C function as this; this write alone is what the tests compare bit for bit with
    the PyTorch path, special values included.) Float32 k, v going into a bfloat16 cache are rounded to nearest even (as
    torch's cast); into an int8 cache each row is quantized, bit for bit as int8_kv.quantize_rows does it."""
    _, kv_heads, num_blocks, block_size, _ = kv_cache.shape
    d = cache_head_dim(kv_cache)
    _check(k.dtype == v.dtype in KERNEL_DTYPES and kv_cache.dtype in KV_KINDS and kv_cache.is_contiguous()
           and (k.dtype == kv_cache.dtype or k.dtype == torch.float32 or kv_cache.dtype == torch.int8)
           and k.shape == v.shape and k.shape[1:] == (kv_heads, d) and k.stride(2) == v.stride(2) == 1
           and k.stride(1) == v.stride(1) == d,
           "k, v [T, kv_heads, head_dim] with contiguous heads, of the cache's dtype or float32", k, v, kv_cache)
    _check(slots.dtype == torch.int64 and slots.is_contiguous() and slots.shape == (k.shape[0],),
           "one int64 slot per row", slots)
    library().jitney_write_kv(int(k.dtype == torch.bfloat16), KV_KINDS[kv_cache.dtype], k.data_ptr(),
                              k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(), kv_cache.data_ptr(),
                              k.shape[0], kv_heads, d, num_blocks, block_size)


def rope_write_kv(qkv: torch.Tensor, heads: int, cos: torch.Tensor, signed_sin: torch.Tensor,
                  kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """The step's rotary embedding and cache write in one pass: qkv [T, heads + 2 KVH, D] (the fused projection,
    heads contiguous, any stride between rows) has its query and key heads rotated in place by cos and signed_sin
    ([T, 1, D] or [T, D], rope.RotaryEmbedding.cos_sin, qkv's dtype), as rope.apply_rotary does; the rotated keys
    and the values then go to their slots [T] (int64) of the layer's cache as write_kv puts them."""
    t, width, d = qkv.shape
    _, kv_heads, num_blocks, block_size, _ = kv_cache.shape
    lib = library()
    _check(d % 2 == 0 and d <= lib.limits[1], "an even head_dim within the kernels' limit", qkv)
    _check(qkv.dtype in KERNEL_DTYPES and qkv.stride(2) == 1 and qkv.stride(1) == d and width == heads + 2 * kv_heads
           and cache_head_dim(kv_cache) == d and kv_cache.is_contiguous() and kv_cache.dtype in KV_KINDS
           and (qkv.dtype == kv_cache.dtype or qkv.dtype == torch.float32 or kv_cache.dtype == torch.int8)
           and cos.dtype == signed_sin.dtype == qkv.dtype and cos.is_contiguous() and signed_sin.is_contiguous()
           and cos.numel() == signed_sin.numel() == t * d,
           "qkv [T, heads + 2 kv_heads, head_dim] with contiguous heads, cos and sine [T, head_dim] of its dtype, "
           "a contiguous cache of its dtype, float32 under it, or int8", qkv, cos, signed_sin, kv_cache)
    _check(slots.dtype == torch.int64 and slots.is_contiguous() and slots.shape == (t,), "one int64 slot per row",
           slots)
    lib.jitney_rope_write_kv(int(qkv.dtype == torch.bfloat16), KV_KINDS[kv_cache.dtype], qkv.data_ptr(),
                             qkv.stride(0), cos.data_ptr(), signed_sin.data_ptr(), slots.data_ptr(),
                             kv_cache.data_ptr(), t, heads, kv_heads, d, num_blocks, block_size)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place, when given), then returns RMSNorm(x) * weight: the residual add and the next
    norm in one pass over the rows (vLLM's fused_add_rms_norm), where PyTorch takes five or six ops."""
    n = x.shape[-1]
    _check(x.dtype in KERNEL_DTYPES and x.is_contiguous() and weight.is_contiguous() and weight.shape == (n,)
           and weight.dtype == x.dtype
           and (delta is None or (delta.is_contiguous() and delta.shape == x.shape and delta.dtype == x.dtype)),
           "contiguous x, delta of x's shape and a weight of its last dimension, one dtype", x, weight)
    out = torch.empty_like(x)
    library().jitney_add_rms_norm(int(x.dtype == torch.bfloat16), x.data_ptr(),
                                  None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                  x.numel() // n, n, eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up from gate_up [T, 2 * inter] (gate first) in one pass, where PyTorch takes three ops."""
    _check(gate_up.dtype in KERNEL_DTYPES and gate_up.is_contiguous() and gate_up.dim() == 2
           and gate_up.shape[-1] % 2 == 0, "contiguous [T, 2 * inter]", gate_up)
    rows, inter = gate_up.shape[0], gate_up.shape[-1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    library().jitney_silu_mul(int(gate_up.dtype == torch.bfloat16), gate_up.data_ptr(), out.data_ptr(), rows, inter)
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of float32 or bfloat16 rows x [B, V] (unit stride within a row): the same index torch gives
    for x.float() (the first maximum; the first NaN where a row has one), rows in parallel, where torch's argmax
    runs on one core (and on bfloat16 rows several times slower than on float32 ones)."""
    _check(x.dtype in KERNEL_DTYPES and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1,
           "float32 or bfloat16 [B, V] rows with V > 0, unit stride within a row", x)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().jitney_argmax(int(x.dtype == torch.bfloat16), x.data_ptr(), x.shape[0], x.shape[1], x.stride(0),
                            out.data_ptr())
    return out


def second_path() -> str:
    """The environment that runs the next kernel loop down from this CPU's own (`make test` runs the suite
    under both): on AVX-512 the AVX2 loop, with oneDNN and PyTorch's own kernels held to AVX2 as well, so an
    AVX-512 machine stands in for an AVX2 one (MKL too); on AVX2 the portable loop (what Arm runs), on the tiny
    model and the kernels' own tests only (JITNEY_TESTS_SKIP_INTEGRATION: the real model under the portable loop
    is an Arm machine's case, not one this project's CI meets, and costs two minutes); elsewhere the PyTorch path."""
    flags = cpuinfo_flags()
    if "avx512f" in flags and {"avx2", "fma"} <= flags:
        return "JITNEY_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2"
    if {"avx2", "fma"} <= flags:
        return "JITNEY_ISA=portable JITNEY_TESTS_SKIP_INTEGRATION=1"
    return "JITNEY_NATIVE=0"


if __name__ == "__main__":  # python -m model_runner.native --second-path: for the Makefile
    import sys
    print(second_path() if sys.argv[1:] == ["--second-path"] else f"kernels: {isa() or 'none (PyTorch path)'}")
