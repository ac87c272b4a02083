"""benchmarks.sim_validate's bookkeeping: which figures count as within target, and within the real runs' own
run-to-run difference (--repeat-real)."""
from benchmarks.sim_validate import FIGURES, compare, tally, within_noise


def summary(tok_s: float, latency: float) -> dict:
    pcts = {"p50": latency, "p90": latency, "p99": latency}
    return {"output_tok_s": tok_s, "ttft_ms": pcts, "inter_token_ms": pcts, "e2e_ms": pcts}


def test_within_noise_takes_the_larger_of_target_and_run_to_run():
    assert within_noise(0.08, 0.0, 0.10)
    assert not within_noise(0.15, 0.05, 0.10)
    assert within_noise(-0.15, 0.20, 0.10)   # the real run itself moved by 20 %
    assert not within_noise(0.25, -0.20, 0.10)


def test_tally_counts_every_figure_of_every_policy():
    real = {"continuous": summary(100.0, 100.0), "static": summary(50.0, 200.0)}
    sim = {"continuous": summary(104.0, 115.0), "static": summary(50.0, 200.0)}   # continuous: latency 15 % off
    again = {"continuous": summary(100.0, 120.0), "static": summary(50.0, 200.0)}  # ... and 20 % run to run
    results = {"case": compare(real, sim)}
    n = 2 * len(FIGURES)
    assert tally(results, {}) == f"within target: {n - 6} of {n} figures"
    assert tally(results, {"case": compare(real, again)}).endswith(f"run-to-run difference: {n} of {n}")
