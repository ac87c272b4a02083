"""Smoke tests of the micro-benchmark and the kernels command: each runs end to end on the tiny model and
fills every row of its table."""
import json

import numpy as np
import pytest
import torch

from benchmarks.micro import COLUMNS, main
from model_runner.kv_cache import kv_row_elements


def test_micro_quick_fills_a_row_per_dtype_and_batch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "micro.json"
    report = main(["--model", "tiny-random", "--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))

    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[1:]]
    assert [(c[0], c[1]) for c in cells] == [(d, b) for d in ("float32", "bfloat16") for b in ("1", "8")]
    for row in report["rows"]:
        for key in ("decode_step_ms", "decode_tok_s", "generate_tok_s", "hf_generate_tok_s", "speedup", "speedup_bound",
                    "achieved_gflops", "roofline_pct"):
            assert row[key] > 0, (row["dtype"], row["batch"], key)
    assert all(g > 0 for g in report["machine"]["matmul_gflops"].values()) and report["machine"]["copy_gbps"] > 0


def test_kernels_command_times_every_path_on_the_tiny_model(capsys):
    from benchmarks.kernels import PATHS, WORKLOADS, main as kernels_main
    from model_runner import native

    report = kernels_main(["--model", "tiny-random", "--steps", "1"])
    if native.library() is None:  # no compiler here: the command says so and compares nothing
        assert report["rows"] == []
        return
    assert [r["step"] for r in report["rows"]] == [w[0] for w in WORKLOADS]
    for row in report["rows"]:
        assert all(row[label] > 0 for label, _, _ in PATHS) and row["speed-up"] > 0
    assert "| decode, batch 64" in capsys.readouterr().out


def test_decode_attention_times_each_pair_scattered_and_resident(capsys):
    """benchmarks.decode_attention on a small shape: a row per (compute, KV cache) pair and batch, GB/s on the
    bytes read beside both bandwidths; --resident reads the same bytes (the same MB column) from L2."""
    from benchmarks import decode_attention
    from model_runner import native
    if native.library() is None:
        return  # nothing to time where the kernels do not build: the command says so itself
    args = ["--layers", "2", "--batches", "2,3", "--context", "20,40", "--rounds", "1",
            "--precisions", "float32:float32,float32:int8"]
    scattered = decode_attention.main(args)
    resident = decode_attention.main(args + ["--resident"])
    assert [(r["compute"], r["kv"], r["batch"]) for r in scattered["rows"]] == [
        ("float32", kv, b) for kv in ("float32", "int8") for b in (2, 3)]
    assert [r["mb_read"] for r in resident["rows"]] == [r["mb_read"] for r in scattered["rows"]]
    assert resident["resident"] and scattered["read_gbps"] > 0
    assert all(r["gb_s"] > 0 and r["of_read"] > 0 for r in scattered["rows"] + resident["rows"])
    assert all(r["bare_gb_s"] > 0 and r["of_bare"] > 0 for r in scattered["rows"] + resident["rows"])
    assert "of bare read" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])  # rows of 16 bytes, and of 12 (int8 values and scale): a run can end mid-word
def test_bare_read_reads_exactly_the_rows_attention_attends(dtype):
    """The decode benchmark's bound reads every K and V row the kernel reads and no other: its checksum (64-bit
    words of each block's attended rows, then their last bytes, all XORed) against the same fold done here."""
    from benchmarks.decode_attention import bare_read, bare_read_library
    if bare_read_library() is None:
        pytest.skip("no C++ compiler here (or JITNEY_NATIVE=0): the bare read is not built")
    kv_heads, blocks, block_size = 2, 9, 4
    row = kv_row_elements(8, dtype) * dtype.itemsize  # bytes
    cache = torch.randint(-128, 128, (2, kv_heads, blocks, block_size, row), dtype=torch.int8).view(dtype)
    tables = torch.tensor([[3, 0, 7], [5, 1, 0], [8, 2, 6]], dtype=torch.int32)
    lens = torch.tensor([9, 3, 12], dtype=torch.int32)
    raw = cache.view(torch.uint8).numpy().reshape(2, kv_heads, blocks, -1)
    want = 0
    for table, n in zip(tables.tolist(), lens.tolist()):
        for b in range(-(-n // block_size)):
            for half in range(2):
                for h in range(kv_heads):
                    run = raw[half, h, table[b], :min(block_size, n - b * block_size) * row]
                    words = len(run) // 8 * 8
                    want ^= int(np.bitwise_xor.reduce(run[:words].view(np.uint64), initial=0))
                    for byte in run[words:]:
                        want ^= int(byte)
    assert bare_read(cache, tables, lens) == want


@pytest.mark.parametrize("precision", ["bfloat16:bfloat16", "bfloat16:int8", "float32:float32", "float32:bfloat16",
                                       "float32:int8"])
def test_prefill_attention_times_each_kernel_that_runs_here(precision, capsys):
    """benchmarks.prefill_attention on a small shape: a row per chunk, the row kernel always and the tiled one
    exactly where it runs (bfloat16 on AVX512-BF16), over each cache a dtype allows."""
    from benchmarks import prefill_attention
    from model_runner import native
    from model_runner.precision import cpu_has_native_bf16
    dtype, kv = precision.split(":")
    if native.library() is None:
        pytest.skip("the native kernels do not build here")
    if dtype == "bfloat16" and not cpu_has_native_bf16():
        pytest.skip("bfloat16 is emulated on this CPU: its matmul ceiling alone runs for minutes on one core")
    result = prefill_attention.main(["--layers", "1", "--prompts", "0:20,16:8", "--reps", "1", "--dtype", dtype,
                                     "--kv-cache-dtype", kv])
    tiled = native.prefill_supported(getattr(torch, dtype), getattr(torch, kv), 9, 3, 64)
    assert (result["dtype"], result["kv_cache_dtype"], result["tiled"]) == (dtype, kv, tiled)
    assert [(r["first"], r["rows"]) for r in result["rows"]] == [(0, 20), (16, 8)]
    assert all(r["row_ms"] > 0 and ("tiled_ms" in r) == tiled and 0 < r["best_of_ceiling"] for r in result["rows"])
    assert f"{dtype} queries over a {kv} KV cache" in capsys.readouterr().out


def test_profile_step_breaks_each_workload_down_with_and_without_the_profiler(capsys):
    """Every workload gets its profiled table and the unprofiled line: matmuls, attention and what is outside
    them add up to the step's wall time, each part measured (none negative, matmuls and attention nonzero)."""
    from benchmarks.profile_step import STEPS, main as profile_main

    report = profile_main(["--model", "tiny-random", "--steps", "1"])
    assert [r["step"] for r in report["results"]] == [s[0] for s in STEPS]
    for row in report["results"]:
        plain = row["unprofiled"]
        assert plain["matmuls_ms"] > 0 and plain["attention_ms"] > 0 and plain["wall_ms"] > 0, row["step"]
        parts = plain["matmuls_ms"] + plain["attention_ms"] + plain["outside_ms"]
        assert abs(parts - plain["wall_ms"]) < 0.05, plain  # the printed figures are rounded to 0.01 ms
        assert row["ops"] and row["wall_ms"] > 0
    assert capsys.readouterr().out.count("without the profiler:") == len(STEPS)


def test_small_matmul_times_onednn_and_checks_the_prefetching_loop(capsys):
    """benchmarks.small_matmul on the tiny model: a row per row count; where the CPU has AVX512-BF16 the
    prefetching loop is timed at every distance and its results are within bfloat16's bound of float64, also at
    shapes with a remainder past the last 32 elements and part of a group of four output rows."""
    from benchmarks import small_matmul

    report = small_matmul.main(["--model", "tiny-random", "--rows", "1,3", "--ahead", "0,2", "--rounds", "1"])
    assert [r["rows"] for r in report["results"]] == [1, 3]
    assert all(r["onednn_ms"] > 0 and r["read_ms"] > 0 for r in report["results"])
    lib = small_matmul.library()
    if lib is None or not lib.jitney_gemv_bf16_available():
        assert "no AVX512-BF16" in capsys.readouterr().out
        pytest.skip("no AVX512-BF16 here: only oneDNN's kernel is timed")
    assert all(r["loop_ms"] > 0 and set(r["by_ahead"]) == {0, 2} and r["error_of_bound"] <= 1
               for r in report["results"])
    gen = torch.Generator().manual_seed(1)
    odd = [(0.1 * torch.randn(n, k, generator=gen)).to(torch.bfloat16) for n, k in ((7, 100), (5, 33), (1, 31))]
    for rows in (1, 2, 3, 4):
        assert small_matmul.check(odd, rows) <= 1


def test_elementwise_bound_times_each_kernel_beside_a_bare_pass(tmp_path, capsys):
    """benchmarks.elementwise_bound on the tiny model's sizes: every row count gets the two native kernels and
    their bare passes, each with its bytes per second and its cost over a step's calls; where the CPU has no
    native kernels for the dtype it says so instead."""
    from benchmarks import elementwise_bound

    out = tmp_path / "b.json"
    report = elementwise_bound.main(["--model", "tiny-random", "--rows", "1,5", "--sets", "3", "--rounds", "1",
                                     "--json", str(out)])
    if not report["rows"]:
        assert "nothing to bound" in capsys.readouterr().out
        pytest.skip("no native elementwise kernels for this dtype here")
    assert [(r["rows"], r["kernel"].split()[0]) for r in report["rows"]] == [
        (rows, k) for rows in (1, 5) for k in ("silu_mul", "bare", "add_rms_norm", "bare")]
    assert all(r["us"] > 0 and r["gbps"] > 0 and r["step_ms"] > 0 for r in report["rows"])
    assert json.loads(out.read_text())["rows"] == report["rows"]
