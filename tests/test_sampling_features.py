"""Sampling features end to end through the engine on tiny-random (float32, greedy, deterministic): each one
changes the output exactly as specified.

The specification is a reference loop written out in the test: score prompt + output so far in one prefill,
apply the feature's formula to the last row by hand, take the argmax. The engine must produce the same tokens
through its own decode steps, batched with requests that do not use the feature.
"""
import torch

from batcher.config import BatcherConfig
from model_runner.sampling_params import SamplingParams

from .engine_helpers import run_requests
from .reference import our_logits

# The engine's decode logits and the reference's one-shot prefill logits differ only by float32 rounding in a
# different order of summation: |logits| < ~10 here, each through 2 layers of 64..128-term dot products, so
# about 1e-5 at most. A step whose top two reference logits are closer than 100x that would make the argmax
# comparison a coin toss, so the reference refuses such a step (the test would be ill-posed, not failed).
MARGIN = 1e-3
PROMPTS = [[5, 40, 77, 120, 9], [200, 13, 13, 250, 61, 88, 7]]
N = 24
CFG = BatcherConfig()


def reference_greedy(runner, prompt, n, adjust):
    """Greedy tokens where step t picks argmax(adjust(raw logits, output so far))."""
    out = []
    for _ in range(n):
        x = adjust(our_logits(runner, prompt + out)[-1].clone(), out)
        top2 = x.topk(2).values
        assert top2[0] - top2[1] > MARGIN, "ill-posed step: a near-tie in the reference"
        out.append(int(x.argmax()))
    return out


def openai_penalties(presence, frequency):
    def adjust(x, out):
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.numel()).float() if out else 0 * x
        return x - frequency * counts - presence * (counts > 0).float()
    return adjust


async def generate(runner, params_list, prompts=PROMPTS):
    """Each request beside a plain greedy one (so the feature is applied per row, not to the whole batch)."""
    plain = [SamplingParams(max_tokens=N, ignore_eos=True) for _ in prompts]
    results, _ = await run_requests(runner, CFG, list(prompts) * 2, list(params_list) + plain)
    return [r[0] for r in results[:len(prompts)]], [r[2] for r in results[:len(prompts)]], \
        [r[0] for r in results[len(prompts):]]


async def test_presence_and_frequency_penalties_follow_openais_formula(tiny_runner):
    for presence, frequency in ((1.5, 0.0), (0.0, 0.7), (0.4, 0.4), (-1.0, 0.0)):
        params = [SamplingParams(max_tokens=N, ignore_eos=True, presence_penalty=presence,
                                 frequency_penalty=frequency) for _ in PROMPTS]
        got, _, plain = await generate(tiny_runner, params)
        for prompt, tokens, base in zip(PROMPTS, got, plain):
            assert tokens == reference_greedy(tiny_runner, prompt, N, openai_penalties(presence, frequency))
            assert base == reference_greedy(tiny_runner, prompt, N, lambda x, out: x)  # companions untouched
        assert got != plain  # it changed the output
        if presence > 0:  # fewer repeats than plain greedy
            assert all(len(set(t)) > len(set(b)) for t, b in zip(got, plain)), (got, plain)


async def test_logit_bias_adds_to_the_logits(tiny_runner):
    plain_first = [reference_greedy(tiny_runner, p, 1, lambda x, out: x)[0] for p in PROMPTS]
    banned = {t: -100.0 for t in plain_first}          # the greedy first tokens, banned
    nudged = {17: 3.0, 30: -2.0}                        # a small bias: it must add exactly, not just dominate
    for bias in (banned, nudged):
        params = [SamplingParams(max_tokens=N, ignore_eos=True, logit_bias=bias) for _ in PROMPTS]
        got, _, plain = await generate(tiny_runner, params)

        def adjust(x, out, bias=bias):
            for t, b in bias.items():
                x[t] += b
            return x
        for prompt, tokens in zip(PROMPTS, got):
            assert tokens == reference_greedy(tiny_runner, prompt, N, adjust)
        assert got != plain
    # -100 really bans: the banned tokens never appear.
    params = [SamplingParams(max_tokens=N, ignore_eos=True, logit_bias=banned) for _ in PROMPTS]
    got, _, _ = await generate(tiny_runner, params)
    assert not set(banned) & {t for tokens in got for t in tokens}


async def test_stop_token_ids_end_the_output_at_that_token(tiny_runner):
    plain = [reference_greedy(tiny_runner, p, N, lambda x, out: x) for p in PROMPTS]
    stops = [tokens[5] for tokens in plain]            # a token greedy emits at step 5 (or earlier)
    params = [SamplingParams(max_tokens=N, ignore_eos=True, stop_token_ids=[s]) for s in stops]
    got, finals, _ = await generate(tiny_runner, params)
    for tokens, final, base, stop in zip(got, finals, plain, stops):
        k = base.index(stop)
        assert tokens == base[:k + 1] and final.finish_reason == "stop"


async def test_min_tokens_bans_stop_tokens_until_reached(tiny_runner):
    """vLLM's meaning: EOS and the stop token ids cannot be sampled before min_tokens tokens are out."""
    plain = [reference_greedy(tiny_runner, p, N, lambda x, out: x) for p in PROMPTS]
    stops = [tokens[2] for tokens in plain]
    min_tokens = 12
    params = [SamplingParams(max_tokens=N, ignore_eos=True, stop_token_ids=[s], min_tokens=min_tokens)
              for s in stops]
    got, finals, _ = await generate(tiny_runner, params)
    for prompt, tokens, final, stop in zip(PROMPTS, got, finals, stops):
        def adjust(x, out, stop=stop):
            if len(out) < min_tokens:
                x[stop] = float("-inf")
            return x
        ref = reference_greedy(tiny_runner, prompt, N, adjust)
        k = next((i for i, t in enumerate(ref) if t == stop), N - 1)
        assert tokens == ref[:k + 1] and len(tokens) > min_tokens - 1 and stop not in tokens[:min_tokens]
        assert final.finish_reason == ("stop" if stop in tokens else "length")


async def test_ignore_eos_generates_past_eos(tiny_runner):
    """A +100 bias on EOS makes greedy emit it at once: the request stops after one token, unless ignore_eos."""
    eos = tiny_runner.eos_token_ids[0]
    force_eos = {eos: 100.0}
    stopping = [SamplingParams(max_tokens=N, logit_bias=force_eos) for _ in PROMPTS]
    got, finals, _ = await generate(tiny_runner, stopping)
    assert all(t == [eos] and f.finish_reason == "stop" for t, f in zip(got, finals))
    going = [SamplingParams(max_tokens=N, logit_bias=force_eos, ignore_eos=True) for _ in PROMPTS]
    got, finals, _ = await generate(tiny_runner, going)
    assert all(t == [eos] * N and f.finish_reason == "length" for t, f in zip(got, finals))


async def test_min_p_of_1_makes_sampling_greedy(tiny_runner):
    """min_p = 1 keeps only the likeliest token (ties aside, which random float logits do not have), so a
    sampled request at temperature 1 must produce the greedy text; with min_p = 0 the same seed does not."""
    plain = [reference_greedy(tiny_runner, p, N, lambda x, out: x) for p in PROMPTS]
    params = [SamplingParams(max_tokens=N, ignore_eos=True, temperature=1.0, seed=3, min_p=1.0) for _ in PROMPTS]
    got, _, _ = await generate(tiny_runner, params)
    assert got == plain
    params = [SamplingParams(max_tokens=N, ignore_eos=True, temperature=1.0, seed=3) for _ in PROMPTS]
    got, _, _ = await generate(tiny_runner, params)
    assert got != plain
