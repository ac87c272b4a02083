"""`jitney plan`: the bisection finds the boundary of a monotone test within its tolerance, and a tiny search
on a fixed step cost returns the configuration, replica count and cost a hand calculation gives."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cost import StepCost
from sim.plan import build_parser, main, run_plan
from sim.probe import DoesNotFit
from sim.search import highest_passing, probes_needed


@settings(max_examples=200, deadline=None)
@given(ceiling=st.floats(1e-3, 1e5), fraction=st.floats(1e-4, 1.0, exclude_max=True),
       tolerance=st.sampled_from([0.001, 0.01, 0.05, 0.2]))
def test_the_bisection_is_monotone_and_lands_within_its_tolerance(ceiling, fraction, tolerance):
    """A test that passes up to a threshold: every probe moves lo up or hi down (never back), lo always passed
    and hi always failed, and on return the threshold lies in [lo, hi) with hi / lo <= 1 + tolerance (or, below
    ceiling / 64, nothing passed and lo = 0)."""
    threshold = ceiling * fraction
    s = highest_passing(lambda r: r <= threshold, ceiling, tolerance)
    lo, hi = 0.0, ceiling
    for rate, passed in s.probes:
        assert passed == (rate <= threshold) and lo < rate < hi
        lo, hi = (rate, hi) if passed else (lo, rate)
    assert (lo, hi) == (s.lo, s.hi)
    if threshold < ceiling / 64:
        assert s.lo == 0 and len(s.probes) == 6 and s.hi > threshold
    else:
        assert s.lo <= threshold < s.hi and s.hi / s.lo <= 1 + tolerance
        # Each bisection halves log(hi / lo); from at most the factor 2 of the halving that first passed.
        halvings = next(i for i, (_, ok) in enumerate(s.probes, 1) if ok)
        assert len(s.probes) <= probes_needed(tolerance, halvings)


class FixedCost:
    """Every step takes the same time, whatever it holds: a sequential server then serves one request of O output
    tokens in O steps (the prefill step yields the first token), so its rate is 1 / (O x seconds)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def cost(self, plan) -> StepCost:
        return StepCost(self.seconds, 0.0, 0.0)


# seconds per step, by device; the h100-sxm "does not fit"
STEP_S = {"a100-80gb": 0.010, "l4": 0.025, "a10g": 0.300}
OUTPUT_TOKENS, REQUESTS = 10, 20


def fixed_cost(cfg, setup):
    if cfg.device not in STEP_S:
        raise DoesNotFit("(the test's) weights larger than the device")
    return FixedCost(STEP_S[cfg.device]), 10_000


def test_a_tiny_search_gives_the_hand_calculation(tmp_path):
    """Sequential policy, a fixed step cost s, requests of 8 prompt and O = 10 output tokens arriving evenly.
    By hand: a replica serves mu = 1 / (O s) req/s: 10 on the a100-80gb (s = 10 ms), 4 on the l4 (25 ms). Below mu
    the next request arrives after the last one finished, so TTFT = ITL = s (within the SLOs); at mu and above the
    queue grows without bound (the ceiling). So the search returns mu within the tolerance (1 %), and for 95 req/s
    the a100-80gb needs ceil(95 / 10) = 10 replicas at $4 = $40/hour, the l4 ceil(95 / 4) = 24 at $1 = $24/hour:
    the l4 is the cheapest, at 24 / (95 x 10 x 3600) x 1e6 = $7.02 per M output tokens. The a10g's ITL (300 ms)
    misses the 200 ms SLO at any rate; the h100-sxm does not fit. Both are listed, not dropped."""
    trace = tmp_path / "even.jsonl"
    trace.write_text("".join(json.dumps(dict(arrival_s=float(i), prompt_tokens=8, output_tokens=OUTPUT_TOKENS)) + "\n"
                             for i in range(REQUESTS)))
    result = run_plan(["--trace", str(trace), "--devices", "a100-80gb,l4,a10g,h100-sxm", "--tp", "1", "--weights",
                       "bfloat16", "--policies", "sequential", "--price", "a100-80gb=4", "--price", "l4=1",
                       "--price", "a10g=0.5", "--target-rate", "95", "--tolerance", "0.01", "--out",
                       str(tmp_path / "out"), "--no-progress"], cost_for=fixed_cost)
    rows = {r["config"]["device"]: r for r in result["rows"]}
    assert [r["config"]["device"] for r in result["rows"]] == ["l4", "a100-80gb", "a10g", "h100-sxm"]
    for device, mu in (("a100-80gb", 10.0), ("l4", 4.0)):
        r = rows[device]
        assert r["capacity"] == pytest.approx(mu, rel=1e-9)
        assert mu / 1.01 <= r["rate"] < mu and r["limit"] == "saturation"
        assert r["ttft_p90_ms"] == pytest.approx(STEP_S[device] * 1e3) == r["itl_p99_ms"]
        assert all(passed == (rate < mu) for rate, passed in r["probes"])
    assert rows["a100-80gb"]["fleet"] == dict(replica_hourly=4.0, replicas=10, hourly=40.0,
                                              per_mtok=pytest.approx(40 / (95 * 10 * 3600) * 1e6))
    assert rows["l4"]["fleet"] == dict(replica_hourly=1.0, replicas=24, hourly=24.0,
                                       per_mtok=pytest.approx(24 / (95 * 10 * 3600) * 1e6))
    assert rows["a10g"]["status"] == "misses the SLOs" and rows["a10g"]["fleet"] is None
    assert rows["a10g"]["limit"] == "ITL p99"
    assert rows["h100-sxm"]["status"] == "does not fit" and rows["h100-sxm"]["probes"] == []
    report = (tmp_path / "out" / "report.md").read_text()
    assert "cheapest for 95 req/s: 24 x l4 bfloat16 sequential" in report and "$7.018 per M output tokens" in report
    assert "does not fit" in report and "misses the SLOs" in report and "SIMULATED" in report
    assert (tmp_path / "out" / "fleet_cost.png").stat().st_size > 0


def test_help_explains_every_flag():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
        assert all(o in text for o in action.option_strings)
    for flag in ("--slo-ttft-p90-ms", "--slo-itl-p99-ms", "--price", "--target-rate", "--devices", "--tp",
                 "--weights", "--policies", "--max-num-seqs", "--max-num-batched-tokens", "--tolerance", "--out"):
        assert flag in text
    assert "default: 2000" in text and "default: 200," in text and "default: 3000" in text


@pytest.mark.parametrize("argv,says", [
    (["--rate", "5"], "the search sets the rate"),
    (["--workload", "burst"], "no rate to search"),
    (["--quick"], "--num-requests"),
    (["--price", "tpu=3"], "DEVICE=USD"),
    (["--tp", "0"], "integers >= 1"),
    (["--weights", "int3"], "comma-separated list"),
])
def test_refusals(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_probes_needed_counts_the_bisections():
    # From a factor-2 bracket to 5 %: log2(ln 2 / ln 1.05) = 3.8, so 4 bisections after the halving.
    assert probes_needed(0.05) == 5 and probes_needed(0.01) == 1 + math.ceil(math.log2(math.log(2) / math.log(1.01)))


def test_the_search_space_is_every_combination_once():
    """max_num_seqs is continuous batching's alone: another policy is one configuration, not one per value."""
    from sim.plan import configurations, parse_args
    args = parse_args(["--devices", "l4,a10g", "--tp", "1,2", "--weights", "int8", "--policies", "dynamic,continuous",
                       "--max-num-seqs", "32,128"])
    labels = [c.label for c in configurations(args)]
    assert len(labels) == len(set(labels)) == 2 * 2 * (1 + 2)
    assert "2x a10g int8 dynamic tokens=512" in labels and "l4 int8 continuous seqs=32 tokens=512" in labels
