"""Long prefills say they are being worked on (batcher/progress.py, from the engine's loop), in counts only.

The engine's progress clock is replaced by a counter (each reading one "second" later), so which steps log does
not depend on this machine's speed: with interval 0 every step of a multi-step prefill but its last logs a line.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import re
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.progress import PrefillProgress

from .engine_helpers import collect, greedy

PROGRESS = re.compile(r"prefill (req-\d+): ([\d,]+) / ([\d,]+) tokens \((\d+)%\) after (\d+\.\d) s")
DONE = re.compile(r"prefill (req-\d+): ([\d,]+) tokens in (\d+\.\d) s")


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run(runner, texts: list[str], budget: int, progress: PrefillProgress) -> list[str]:
    """Serves the texts at once (prompts are their bytes: tiny-random's tokenizer) and returns the engine's lines."""
    async def go():
        engine = Engine(runner, BatcherConfig(max_num_batched_tokens=budget, enable_prefix_caching=False))
        engine.prefill_progress = progress
        await engine.start()
        try:
            ids = [runner.tokenizer(t)["input_ids"] for t in texts]
            streams = [await engine.add_request(p, greedy(2)) for p in ids]
            await asyncio.gather(*(collect(s) for s in streams))
            return [len(p) for p in ids]
        finally:
            await engine.stop()

    lines = Lines()
    logger = logging.getLogger("jitney.engine")
    logger.addHandler(lines)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        lengths = asyncio.run(go())
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old_level)
    return lengths, lines.messages


def counter() -> callable:
    ticks = itertools.count()
    return lambda: float(next(ticks))


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.text("abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=400), min_size=1, max_size=3),
       budget=st.integers(16, 128))
def test_every_multi_step_prefill_reports_counts_and_no_text(tiny_runner, texts, budget):
    lengths, messages = run(tiny_runner, texts, budget, PrefillProgress(interval_s=0, clock=counter()))
    by_request: dict[str, list[int]] = {}
    ended: dict[str, int] = {}
    for m in messages:
        if not m.startswith("prefill "):
            continue
        if p := PROGRESS.fullmatch(m):  # the whole line is the template: no room for the prompt's text
            rid, done, total = p[1], int(p[2].replace(",", "")), int(p[3].replace(",", ""))
            assert 0 < done < total == lengths[int(rid.removeprefix("req-"))] and rid not in ended
            assert int(p[4]) == 100 * done // total
            by_request.setdefault(rid, []).append(done)
        else:
            d = DONE.fullmatch(m)
            assert d, m
            ended[d[1]] = int(d[2].replace(",", ""))
    for i, n in enumerate(lengths):
        rid = f"req-{i}"
        done = by_request.get(rid, [])
        assert done == sorted(set(done))  # each line further along than the last
        if n > budget:  # more than one step's budget: at least one line per step but the last, then the end
            assert len(done) >= -(-n // budget) - 1 and ended[rid] == n
        assert (rid in ended) == bool(done)


def test_lines_come_at_most_every_interval(tiny_runner):
    """With the clock advancing 1 s a reading, a 1,000-token prompt in 16-token steps (63 steps) logs a line per
    at least 5 s of that clock, not per step."""
    lengths, messages = run(tiny_runner, ["x" * 1000], 16, PrefillProgress(interval_s=5, clock=counter()))
    times = [float(p[5]) for m in messages if (p := PROGRESS.fullmatch(m))]
    assert len(times) >= 2 and all(b - a >= 5 for a, b in zip(times, times[1:]))
    assert len(times) < -(-lengths[0] // 16) - 1


def test_short_prompts_log_nothing(tiny_runner):
    """The default interval (5 s) on the real clock: a prompt of a few steps on the tiny model never logs."""
    _, messages = run(tiny_runner, ["hello there"] * 3, 512, PrefillProgress())
    assert not [m for m in messages if m.startswith("prefill ")]


# --- jitney generate: bars on stderr ----------------------------------------------------------------------

@settings(max_examples=10, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(length=st.integers(1, 1000), tty=st.booleans())
def test_generate_shows_bars_on_a_terminal_or_for_a_long_prompt(tiny_runner, monkeypatch, capsys, length, tty):
    """Bars (prefill, then generate) on stderr exactly when stderr is a terminal or the prompt is longer than one
    step (512 tokens, the server's default budget); stdout holds the generated text alone either way."""
    import model_runner.runner
    from jitney.cli import main
    monkeypatch.setattr(model_runner.runner, "ModelRunner", lambda *a, **k: tiny_runner)  # one load for all
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    prompt = "x" * (length - len(tiny_runner.tokenizer("")["input_ids"]))
    assert main(["generate", "--model", "tiny-random", "--prompt", prompt, "--max-tokens", "3", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    shown = tty or length > 512
    assert ("prefill: 100%" in err and "generate: 100%" in err and f"{length}/{length}" in err) == shown
    assert ("prefill:" in err or "generate:" in err) == shown
    assert "prefill" not in out and f"[{length} prompt tokens, 3 generated" in err
