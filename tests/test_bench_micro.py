"""Smoke tests of the micro-benchmark and the kernels command: each runs end to end on the tiny model and
fills every row of its table."""
import json

from benchmarks.micro import COLUMNS, main


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
    assert "of read bandwidth" in capsys.readouterr().out
