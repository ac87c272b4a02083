"""The memory planner's capacity arithmetic, and a smoke run of the roofline command on the tiny model."""
import dataclasses
import json

import pytest

from benchmarks import memory_plan as mp
from benchmarks.cost import decode_step_cost, prefill_cost
from benchmarks.roofline import COLUMNS, main as roofline_main

# --- memory planner ------------------------------------------------------------------------------------------

BF16 = mp.Settings(dtype_bytes=2, kv_dtype_bytes=2)


@pytest.mark.parametrize("name, per_token", [
    ("smollm2-135m", 2 * 30 * 3 * 64 * 2),    # 23,040 B
    ("llama3-70b", 2 * 80 * 8 * 128 * 2),     # 327,680 B: GQA keeps it small for a 70B model
    ("story-6b", 2 * 28 * 16 * 256 * 2),      # 458,752 B: no GQA
    ("llama2-7b", 2 * 32 * 32 * 128 * 2),     # 524,288 B
    ("llama3-8b", 2 * 32 * 8 * 128 * 2),      # 131,072 B
])
def test_kv_bytes_per_token(name, per_token):
    assert mp.kv_bytes_per_token(mp.PRESETS[name], 2) == per_token
    assert mp.kv_bytes_per_token(mp.PRESETS[name], 1) == per_token / 2  # an fp8 KV cache halves it


def test_llama3_70b_breakdown_needs_four_cards_in_bf16():
    m, s = mp.PRESETS["llama3-70b"], dataclasses.replace(BF16, context=4096, batch=64, device_gb=80)
    b = mp.breakdown(m, s)
    assert b["weights"] == pytest.approx(141.2e9)
    assert b["kv_cache"] == 64 * 4096 * 327_680
    assert b["overhead"] == pytest.approx(1e9 + 0.1 * 141.2e9)
    assert b["usable"] == pytest.approx(72e9)
    assert b["total"] == pytest.approx(b["weights"] + b["kv_cache"] + b["overhead"])
    assert not mp.fits(m, s) and mp.max_batch(m, s) == 0 and mp.max_context(m, s) == 0
    assert mp.cards_needed(m, s) == 4
    # Over 4 cards each holds a quarter of the weights and 2 of the 8 KV heads.
    b4 = mp.breakdown(m, dataclasses.replace(s, cards=4))
    assert b4["weights"] == pytest.approx(141.2e9 / 4) and b4["kv_cache"] == b["kv_cache"] / 4


def test_more_cards_than_kv_heads_replicate_the_kv():
    m = mp.PRESETS["smollm2-135m"]  # 3 KV heads: 4 cards still hold one head each
    one, four = (mp.kv_bytes_per_seq(m, dataclasses.replace(BF16, cards=n), 1024) for n in (1, 4))
    assert four == one / 3


def test_kv_is_allocated_in_whole_blocks():
    m = mp.PRESETS["smollm2-135m"]
    assert mp.kv_bytes_per_seq(m, BF16, 2049) == 129 * 16 * 23_040
    assert mp.kv_bytes_per_seq(m, BF16, 2048) == 128 * 16 * 23_040


@pytest.mark.parametrize("name, context", [("story-6b", 2048), ("llama3-8b", 8192), ("smollm2-135m", 4096)])
def test_max_batch_and_max_context_are_the_edges_of_fitting(name, context):
    m, s = mp.PRESETS[name], dataclasses.replace(BF16, context=context, batch=32, device_gb=80)
    n = mp.max_batch(m, s)
    assert mp.fits(m, dataclasses.replace(s, batch=n)) and not mp.fits(m, dataclasses.replace(s, batch=n + 1))
    c = mp.max_context(m, s)
    assert c % s.block_size == 0
    assert mp.fits(m, dataclasses.replace(s, context=c))
    assert not mp.fits(m, dataclasses.replace(s, context=c + s.block_size))


def test_story_6b_at_2048_fits_61_sequences_on_80_gb():
    m, s = mp.PRESETS["story-6b"], dataclasses.replace(BF16, context=2048, batch=64, device_gb=80)
    # (72 - 12.1 weights - 2.21 overhead) GB / (2048 x 458,752 B per sequence) = 61.4
    assert mp.max_batch(m, s) == 61 and not mp.fits(m, s)


def test_parse_count():
    assert mp.parse_count("6.05B") == pytest.approx(6.05e9)
    assert mp.parse_count("134.5M") == pytest.approx(134.5e6)
    assert mp.parse_count("7e9") == 7e9


def test_shape_from_config_counts_every_parameter(tmp_path, monkeypatch):
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path))
    from model_runner.config import ModelConfig
    from model_runner.loader import load_weights, resolve_model
    path = resolve_model("tiny-random")
    mc = ModelConfig.from_hf_dir(path)
    shape = mp.shape_from_config("tiny-random", mc)
    assert shape.params == sum(w.numel() for w in load_weights(path).values())
    assert mp.kv_bytes_per_token(shape, 2) == mc.kv_bytes_per_token_per_element * 2


def test_cli_says_what_does_not_fit_and_the_ways_out(capsys):
    story = mp.main(["--preset", "story-6b", "--device-gb", "80", "--context", "2048"])
    assert "fits: NO" in story and "max batch at context 2,048: 61 sequences" in story
    assert "458,752 B" in story
    big = mp.main(["--preset", "llama3-70b", "--device-gb", "80", "--context", "4096"])
    assert "no batch fits at any context" in big
    assert "| bf16 | bf16 | 242.22 | 0 | 0 | 4 |" in big  # 4 cards in bf16
    assert "| q4_0 | int8/fp8 | 87.63 |" in big  # Q4_0 as held: 18 B per 32 weights
    small = mp.main(["--params", "8.03B", "--layers", "32", "--kv-heads", "8", "--head-dim", "128",
                     "--context", "8192", "--batch", "16"])
    assert "fits: yes" in small and "ways out" not in small
    with pytest.raises(SystemExit):
        mp.main(["--params", "7B", "--layers", "32"])


# --- roofline ------------------------------------------------------------------------------------------------

def test_prefill_of_one_token_costs_a_decode_step_at_context_one(tmp_path, monkeypatch):
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path))
    from model_runner.config import ModelConfig
    from model_runner.loader import resolve_model
    mc = ModelConfig.from_hf_dir(resolve_model("tiny-random"))
    assert prefill_cost(mc, 1, 2) == decode_step_cost(mc, 1, 1, 2)


def test_roofline_quick_writes_table_json_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "roofline"
    report = roofline_main(["--model", "tiny-random", "--quick", "--out", str(out)])

    assert json.loads((out / "roofline.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = "| " + " | ".join(COLUMNS) + " |"
    assert header in capsys.readouterr().out and header in (out / "roofline.md").read_text()

    rows = report["rows"]
    assert [(r["kind"], r["batch"]) for r in rows] == [("decode", 1), ("decode", 8), ("prefill", 1)]
    assert rows[-1]["tokens_per_step"] == 128
    for r in rows:
        assert r["step_ms"] > 0 and r["achieved_gflops"] > 0 and r["intensity"] > 0 and r["others_cpu_pct"] >= 0
        assert r["attainable_gflops"] <= report["machine"]["matmul_gflops"]["bfloat16"]
        assert r["bound"] == ("memory" if r["intensity"] < report["ridge_flop_per_byte"] else "compute")
    # More sequences share each weight read: intensity grows with the batch, and prefill's is highest.
    assert rows[0]["intensity"] < rows[1]["intensity"] < rows[2]["intensity"]
