import pytest
import torch

from model_runner.errors import InvalidRequestError
from model_runner.sampler import (Sampler, apply_logit_bias, apply_min_p, apply_presence_frequency_penalty,
                                  apply_repetition_penalty, apply_top_k_top_p, make_generator)
from model_runner.sampling_params import SamplingParams

V = 50


def sample(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], histories=None) -> torch.Tensor:
    return sampler(logits, params, [make_generator(p.seed, "cpu") for p in params], histories)


def test_greedy_is_argmax_and_consumes_no_randomness():
    torch.manual_seed(0)
    logits = torch.randn(6, V, dtype=torch.bfloat16)
    sampler = Sampler(seed=1)
    g = make_generator(7, "cpu")
    shared_state = sampler._shared_generator(logits.device).get_state()
    out = sampler(logits, [SamplingParams(seed=7)] * 6, [g] * 6)
    assert out.dtype == torch.int64 and torch.equal(out, logits.argmax(-1))
    assert torch.equal(g.get_state(), make_generator(7, "cpu").get_state())
    assert torch.equal(sampler._shared_generator(logits.device).get_state(), shared_state)


def test_greedy_row_unaffected_by_sampled_rows():
    torch.manual_seed(0)
    sampler = Sampler(seed=1)
    params = [SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=2.0, top_k=5, seed=3),
              SamplingParams(), SamplingParams(temperature=0.7, top_p=0.5)]
    for _ in range(20):
        logits = torch.randn(5, V)
        out = sample(sampler, logits, params)
        assert out[1] == logits[1].argmax() and out[3] == logits[3].argmax()


def test_same_seed_same_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, V)
    params = [SamplingParams(temperature=1.0, seed=42)]
    runs = []
    for _ in range(2):
        g, sampler = make_generator(42, "cpu"), Sampler()
        runs.append([sampler(logits, params, [g]).item() for _ in range(100)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 5  # it really samples


def test_seeded_row_independent_of_batch():
    torch.manual_seed(0)
    steps = [torch.randn(8, V) for _ in range(30)]
    histories = [list(range(i, i + 10)) for i in range(8)]
    mine = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234, repetition_penalty=1.3)
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, seed=9), SamplingParams(),
              SamplingParams(temperature=1.2, top_k=3), SamplingParams(temperature=1.0, seed=1234),
              SamplingParams(temperature=0.8, top_p=0.7, repetition_penalty=0.8), SamplingParams(temperature=1.5)]
    batch = others[:3] + [mine] + others[3:]

    g_alone = make_generator(mine.seed, "cpu")
    alone = [Sampler()(s[3:4], [mine], [g_alone], histories[3:4]).item() for s in steps]
    sampler, gens = Sampler(), [make_generator(p.seed, "cpu") for p in batch]
    batched = [sampler(s, batch, gens, histories)[3].item() for s in steps]
    assert alone == batched


def test_top_k_1_and_tiny_top_p_are_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, V)
    sampler = Sampler(seed=0)
    assert torch.equal(sample(sampler, logits, [SamplingParams(temperature=1.0, top_k=1)] * 64), logits.argmax(-1))
    assert torch.equal(sample(sampler, logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 64), logits.argmax(-1))


def test_top_k_stays_in_top_k():
    torch.manual_seed(0)
    logits = torch.randn(V).expand(200, V)
    out = sample(Sampler(seed=0), logits, [SamplingParams(temperature=2.0, top_k=5)] * 200)
    allowed = set(logits[0].topk(5).indices.tolist())
    assert set(out.tolist()) <= allowed and len(set(out.tolist())) > 1


def test_top_p_stays_in_nucleus():
    torch.manual_seed(0)
    row = torch.randn(20) * 2
    probs = row.softmax(-1).tolist()
    nucleus, mass = set(), 0.0
    for j in sorted(range(20), key=lambda j: -probs[j]):
        nucleus.add(j)
        mass += probs[j]
        if mass >= 0.9:
            break
    assert 1 < len(nucleus) < 20
    out = sample(Sampler(seed=0), row.expand(300, 20), [SamplingParams(temperature=1.0, top_p=0.9)] * 300)
    assert set(out.tolist()) <= nucleus


def test_filters_per_row_and_off_rows_untouched():
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    out = apply_top_k_top_p(logits, torch.tensor([3, V, V]), torch.tensor([1.0, 1.0, 0.5]))
    assert out[0].isfinite().sum() == 3 and torch.equal(out[0].topk(3).indices, logits[0].topk(3).indices)
    assert torch.equal(out[1], logits[1])
    assert 1 <= out[2].isfinite().sum() < V


def test_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    temperature, n = 1.5, 4000
    out = sample(Sampler(seed=0), logits.expand(n, 4), [SamplingParams(temperature=temperature)] * n)
    expected = (logits / temperature).softmax(-1) * n
    observed = torch.bincount(out, minlength=4).float()
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 20, (observed, expected)  # 3 degrees of freedom: p(chi2 > 20) ~ 2e-4


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    history = torch.randint(0, V, (4, 12))  # duplicates included
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        got = apply_repetition_penalty(logits, torch.full((4,), penalty), history.tolist())
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    # Ragged histories and per-row penalties, through the sampler: penalised greedy rows are argmax of HF's logits.
    histories = [history[i, : 3 * i + 1].tolist() for i in range(4)]
    params = [SamplingParams(repetition_penalty=r) for r in (1.3, 1.0, 2.0, 0.5)]
    expected = torch.stack([RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([h]), logits[i : i + 1].clone())[0]
                            for i, (p, h) in enumerate(zip(params, histories))])
    before = logits.clone()
    assert torch.equal(sample(Sampler(), logits, params, histories), expected.argmax(-1))
    assert torch.equal(logits, before)  # the caller's logits are not modified


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_k", -2), ("top_k", 2.0), ("top_p", 0.0), ("top_p", 1.01), ("repetition_penalty", 0.0),
    ("seed", -1), ("seed", 2**63), ("seed", "1"), ("min_tokens", -1), ("min_tokens", 17),
    ("stop_token_ids", [-1]), ("stop", [""]), ("ignore_eos", "yes"),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("frequency_penalty", float("inf")),
    ("logit_bias", {3: 100.5}), ("logit_bias", {-1: 1.0}), ("logit_bias", [1, 2]), ("min_p", -0.1), ("min_p", 1.1),
])
def test_validate_rejects(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value}).validate()


def test_validate_accepts_and_normalises():
    p = SamplingParams(max_tokens=5, temperature=0.7, top_k=-1, top_p=1, seed=2**63 - 1, repetition_penalty=1.1,
                       stop_token_ids=[2, 3], stop="\n\n", min_tokens=5).validate()
    assert p.stop_token_ids == (2, 3) and p.stop == ("\n\n",) and not p.greedy
    assert SamplingParams(stop=["a", "b"]).validate().stop == ("a", "b") and SamplingParams().validate().greedy


# --- OpenAI's penalties, logit_bias, min_p ----------------------------------------------------------------

def test_presence_frequency_penalty_is_openais_formula():
    """logit[j] -= frequency * count[j] + presence * (count[j] > 0), over the generated tokens only.
    Exact: the inputs are small integers and halves, which float32 represents and adds exactly."""
    logits = torch.zeros(3, 8)
    outputs = [[3, 3, 5], [], [7]]
    got = apply_presence_frequency_penalty(logits, torch.tensor([0.5, 1.0, -1.0]), torch.tensor([1.0, 2.0, 0.5]),
                                           outputs)
    expected = torch.zeros(3, 8)
    expected[0, 3], expected[0, 5] = -(2 * 1.0 + 0.5), -(1 * 1.0 + 0.5)
    expected[2, 7] = -(0.5 - 1.0)  # negative penalties encourage
    assert torch.equal(got, expected) and torch.equal(logits, torch.zeros(3, 8))


def test_penalties_through_the_sampler_change_greedy_tokens_per_row():
    """Row 0 repeats its argmax; a frequency penalty larger than the gap to the runner-up moves it there.
    Row 1 has no penalty and must keep its argmax."""
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0], [0.0, 3.0, 2.5, 0.0]])
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams()]
    out = Sampler()(logits, params, [None, None], None, [[1], [1]])
    assert out.tolist() == [2, 1]
    with pytest.raises(ValueError, match="output_histories"):
        Sampler()(logits, params, [None, None])


def test_logit_bias_per_row_and_batched():
    logits = torch.zeros(3, 6)
    out = apply_logit_bias(logits, [((1, 5.0), (4, -100.0)), (), ((0, 2.5), (0, 1.0))])
    expected = torch.zeros(3, 6)
    expected[0, 1], expected[0, 4], expected[2, 0] = 5.0, -100.0, 3.5
    assert torch.equal(out, expected)


def test_logit_bias_forces_and_bans_through_the_sampler():
    torch.manual_seed(0)
    logits = torch.randn(4, V)  # |randn| < 100 - the bias dominates by construction
    top = logits.argmax(-1)
    params = [SamplingParams(logit_bias={7: 100.0}), SamplingParams(logit_bias={int(top[1]): -100.0}),
              SamplingParams(), SamplingParams(temperature=1.0, seed=1, logit_bias={9: 100.0})]
    out = sample(Sampler(), logits, params)
    assert out[0] == 7 and out[1] != top[1] and out[2] == top[2] and out[3] == 9


def test_no_processor_set_means_no_copy():
    """The common path does no extra work: the logits tensor itself reaches argmax."""
    logits = torch.randn(4, V, dtype=torch.bfloat16)
    assert Sampler._adjust(logits, [SamplingParams()] * 4, None, None) is logits


def test_min_p_keeps_tokens_within_the_ratio():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = apply_min_p(probs.log().unsqueeze(0), torch.tensor([0.25])).isfinite()[0].tolist()
    assert kept == [True, True, True, False]  # 0.15 >= 0.25 * 0.5 > 0.05
    out = sample(Sampler(seed=0), probs.log().expand(400, 4), [SamplingParams(temperature=1.0, min_p=0.25)] * 400)
    assert set(out.tolist()) == {0, 1, 2}
    off = torch.randn(2, V)
    assert torch.equal(apply_min_p(off, torch.tensor([0.0, 0.0])), off)  # 0 = off: untouched
    assert torch.equal(sample(Sampler(seed=0), off, [SamplingParams(temperature=1.0, min_p=1.0)] * 2), off.argmax(-1))
