"""benchmarks.ceiling's chain bound on generated traces, schedules and step costs: no schedule takes fewer steps
than min_steps, and the fitted line lies under every measured step and is the best such line."""
import random

from hypothesis import given, settings, strategies as st

from benchmarks.ceiling import fixed_and_per_row, min_steps
from benchmarks.trace import TraceRequest

requests = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 30)), min_size=1, max_size=20)


def any_schedule(trace: list[TraceRequest], budget: int, max_seqs: int, rng: random.Random) -> int:
    """The steps of one schedule picked at random: each step takes prompt chunks and decodes of whichever
    requests it likes, within the step's token budget and decode limit, a request's work in order."""
    prompt_left = [r.prompt_tokens for r in trace]
    decode_left = [r.output_tokens - 1 for r in trace]
    steps = 0
    while any(prompt_left) or any(decode_left):
        steps += 1
        room, seqs = budget, max_seqs
        for i in rng.sample(range(len(trace)), len(trace)):
            if prompt_left[i] and room:  # a chunk of the prompt; the first token comes out of its last chunk
                n = rng.randint(1, min(room, prompt_left[i]))
                prompt_left[i] -= n
                room -= n
            elif not prompt_left[i] and decode_left[i] and room and seqs and rng.random() < 0.8:
                decode_left[i] -= 1
                room -= 1
                seqs -= 1
    return steps


@settings(max_examples=150)
@given(requests, st.integers(8, 128), st.integers(1, 16), st.integers(0, 2**32))
def test_no_schedule_takes_fewer_steps(lengths, budget, max_seqs, seed):
    trace = [TraceRequest(0.0, p, o) for p, o in lengths]
    bound = min_steps(trace, budget, max_seqs)
    assert bound >= max(r.output_tokens - 1 for r in trace)  # the longest chain of decodes
    rng = random.Random(seed)  # not st.randoms: hypothesis records each of its draws, 100x slower here
    for _ in range(3):
        assert any_schedule(trace, budget, max_seqs, rng) >= bound


def test_min_steps_is_reached_where_one_chain_or_the_budget_binds():
    # One request: its prompt in ceil(100 / 32) = 4 steps, then 9 decodes, one a step.
    assert min_steps([TraceRequest(0.0, 100, 10)], 32, 8) == 13
    # 64 one-token prompts and 64 x 3 decodes through 16 tokens a step: (64 + 192) / 16 = 16 steps.
    assert min_steps([TraceRequest(0.0, 1, 4)] * 64, 16, 128) == 16
    # The same with room for every token but 8 decodes a step: 192 / 8 = 24.
    assert min_steps([TraceRequest(0.0, 1, 4)] * 64, 4096, 8) == 24


@given(st.dictionaries(st.integers(1, 256), st.floats(1e-4, 1.0), min_size=1, max_size=9),
       st.integers(1, 500), st.integers(1, 50_000), st.floats(0.0, 1.0), st.floats(0.0, 0.01))
def test_the_line_is_under_every_step_and_no_line_under_them_bounds_higher(points, steps, rows, f, r):
    fixed, per_row = fixed_and_per_row(points, steps, rows)
    assert fixed >= 0 and per_row >= 0
    assert all(fixed + per_row * b <= s * (1 + 1e-9) for b, s in points.items())
    if all(f + r * b <= s for b, s in points.items()):  # any other line under the points bounds no higher
        assert f * steps + r * rows <= (fixed * steps + per_row * rows) * (1 + 1e-9)


def test_a_fixed_plus_per_row_cost_is_found_exactly():
    points = {b: 0.030 + 0.001 * b for b in (1, 2, 4, 8, 16, 32, 64, 128)}
    fixed, per_row = fixed_and_per_row(points, 251, 16_800)
    assert abs(fixed - 0.030) < 1e-12 and abs(per_row - 0.001) < 1e-12
    # A concave cost: the best line for many small steps leans on the fixed part, for few large ones on rows.
    concave = {b: 0.030 + 0.002 * b ** 0.8 for b in (1, 8, 64, 128)}
    assert fixed_and_per_row(concave, 10_000, 1)[0] > fixed_and_per_row(concave, 1, 10_000)[0]
