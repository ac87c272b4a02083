"""`jitney bench` in-process on the tiny model: traces round-trip, replay is open-loop, --quick fills its table."""
from batcher.config import BatcherConfig
from benchmarks.bench import QUICK, run_bench
from benchmarks.report import COLUMNS, summarize, wall_seconds
from benchmarks.targets import run_policy
from benchmarks.trace import TraceRequest, burst, load_trace, poisson, save_trace, synth_prompt_ids


def test_trace_jsonl_round_trip(tmp_path):
    trace = poisson(20, 5.0, (8, 64), (4, 32), seed=3) + [TraceRequest(9.5, 3, 2, prompt="hello there")]
    save_trace(trace, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == trace
    assert '"prompt"' not in (tmp_path / "t.jsonl").read_text().splitlines()[0]  # optional, left out when None


def test_poisson_is_sorted_with_the_asked_rate_and_lengths():
    trace = poisson(2000, 8.0, (16, 256), (8, 128), seed=1)
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert abs((len(trace) - 1) / arrivals[-1] - 8.0) < 0.8  # within 10% of the rate
    assert all(16 <= r.prompt_tokens <= 256 and 8 <= r.output_tokens <= 128 for r in trace)
    assert poisson(50, 8.0, (16, 256), (8, 128), seed=1) == trace[:50]  # seeded
    assert {r.arrival_s for r in burst(5, (1, 2), (1, 2))} == {0.0}


def test_synth_prompt_ids_exact_deterministic_and_distinct(tiny_runner):
    tok = tiny_runner.tokenizer
    for n in (1, 17, 300):
        ids = synth_prompt_ids(tok, n, seed="a")
        assert len(ids) == n and ids == synth_prompt_ids(tok, n, seed="a")
    a, b = synth_prompt_ids(tok, 64, "a"), synth_prompt_ids(tok, 64, "b")
    assert a[:16] != b[:16]  # differ in the first KV block: no prefix-cache hit
    s, t = synth_prompt_ids(tok, 64, "a", shared_prefix=32), synth_prompt_ids(tok, 64, "b", shared_prefix=32)
    assert s[:32] == t[:32] and s[32:] != t[32:] and len(s) == 64


async def test_replay_is_open_loop_while_the_engine_is_busy(tiny_runner):
    # Sequential, 150 forced tokens each, arrivals 2 ms apart: every request after the first arrives while
    # the engine is busy with the first (150 steps), whatever the machine's speed.
    trace = [TraceRequest(0.002 * i, 16, 150) for i in range(10)]
    records, steps = await run_policy(tiny_runner, BatcherConfig(policy="sequential"), trace, seed=0, progress=False)
    assert all(r.ok and r.output_tokens == 150 and r.finish_reason == "length" and r.prompt_tokens == 16
               for r in records)
    lags = [r.submitted_s - r.arrival_s for r in records]
    assert all(0 <= lag < 0.2 for lag in lags), lags  # closed loop would lag by whole requests (>= 0.15 s)
    # It was sent on time although the engine had a backlog: it queued behind most of the nine before it.
    # (Its admission came after the request two before it had finished: a bound in the schedule's own order, not
    # in a ratio of step times, which contention on a busy machine moves.)
    admitted = records[-1].submitted_s + records[-1].queue_ms / 1e3
    assert admitted > records[-3].finished_s, (admitted, [r.finished_s for r in records])
    s = summarize(records, wall_seconds(records), steps)
    assert s["completed"] == 10 and s["output_tokens"] == 1500 and s["mean_batch"] == 1.0
    assert s["e2e_ms"]["p99"] >= s["e2e_ms"]["p50"] >= s["ttft_ms"]["p50"] > 0


def test_bench_quick_prints_every_policy(tmp_path, capsys):
    out = tmp_path / "results.json"
    report = run_bench(["--model", "tiny-random", "--quick", "--dtype", "float32", "--no-progress",
                        "--out", str(tmp_path)])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    assert [line.split("|")[1].strip() for line in table[1:5]] == ["sequential", "static", "dynamic", "continuous"]
    for result in report["runs"]:
        policy, s = result["policy"], result["summary"]
        assert s["completed"] == 8 and s["output_tok_s"] > 0 and s["refused"] == 0, policy
        assert len(result["records"]) == 8 and s["steps"]
    assert out.exists()


def test_ceiling_draws_the_traces_own_lengths_and_bounds_every_policy(tmp_path, capsys):
    import random

    from benchmarks.ceiling import decode_contexts, main as ceiling_main, prefill_prompts

    trace = poisson(30, 5.0, (8, 64), (4, 32), seed=2)
    contexts = decode_contexts(trace, 200, random.Random(0))
    assert all(min(r.prompt_tokens for r in trace) < c < max(r.prompt_tokens + r.output_tokens for r in trace)
               for c in contexts)
    prompts = prefill_prompts(trace, 512, random.Random(0))
    assert sum(prompts) == 512 and all(0 < n <= 64 for n in prompts)

    report = ceiling_main(["--model", "tiny-random", "--quick", "--dtype", "float32", "--steps", "1",
                           "--compare", "static=1", "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "ceiling" in out and "static: 1 output tok/s measured" in out
    assert set(report["decode_s_per_token"]) == {1, 2, 4, 8, 16, 32, 64, 128}  # up to max_num_seqs
    # The chains' tail only adds busy time: the ceiling is at most the work bound, and takes at least the longest
    # request's decode steps.
    assert report["ceiling_tok_s"] <= report["work_bound_tok_s"]
    assert report["min_steps"] >= QUICK["output_len"][0] - 1
    # The least busy time is every prompt token at the prefill cost and every later output token at the best
    # decode cost; a measured run of the same trace (the engine bench) cannot beat it by much.
    bench = run_bench(["--model", "tiny-random", "--quick", "--dtype", "float32", "--policies", "continuous",
                       "--no-progress", "--out", str(tmp_path / "bench")])
    continuous = next(r for r in bench["runs"] if r["policy"] == "continuous")
    assert continuous["summary"]["output_tok_s"] < 1.5 * report["ceiling_tok_s"]


def test_bench_passes_quantization_and_kv_cache_dtype_to_the_engine(tmp_path, capsys):
    # The header's model line is the runner's own describe(): the flags reached the engine that served the runs.
    run_bench(["--model", "tiny-random", "--quick", "--dtype", "float32", "--policies", "continuous",
               "--quantization", "int8", "--kv-cache-dtype", "int8", "--no-progress", "--out", str(tmp_path)])
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model tiny-random"))
    assert "int8 KV cache" in model_line and "quantized matmul" in model_line


def test_kv_layout_times_the_last_rounds_steps_as_laid_out_and_packed(tmp_path, capsys):
    from benchmarks.kv_layout import main as kv_layout_main, packed, run_pairs

    # Packing keeps each sequence's block count and context, and lays the tables end to end, ascending.
    step = [([7, 3, 9], 40), ([2], 5), ([11, 12], 20)]
    assert packed(step) == [([0, 1, 2], 40), ([3], 5), ([4, 5], 20)]
    assert run_pairs([step]) == (3, 1, 0) and run_pairs([[([5, 4, 3], 40)]]) == (2, 0, 2)
    report = kv_layout_main(["--model", "tiny-random", "--quick", "--dtype", "float32", "--rounds", "2",
                             "--samples", "3", "--reps", "2", "--no-progress", "--json", str(tmp_path / "k.json")])
    out = capsys.readouterr().out
    assert "round 1:" in out and "the layout costs these steps" in out
    assert len(report["rounds"]) == 2 and all(r["output_tok_s"] > 0 for r in report["rounds"])
    assert 1 <= len(report["steps"]) <= 3 and report["layout_cost"] > 0
    assert (tmp_path / "k.json").exists()


def test_bench_device_reaches_the_runner():
    # --device cuda (benchmarks.cuda_check's real runs) must reach the runner, not fall back to the CPU silently.
    from benchmarks.bench import build_parser
    from benchmarks.targets import runner_config
    args = build_parser().parse_args(["--model", "tiny-random", "--device", "cuda"])
    assert runner_config(args).device == "cuda"
    assert runner_config(build_parser().parse_args(["--model", "tiny-random"])).device == "cpu"
