"""Traces: when each request arrives and how long its prompt and output are, as JSONL, plus synthetic ones.

A trace holds lengths, not text, so one trace serves any tokenizer: replay makes each prompt of exactly
prompt_tokens tokens (synth_prompt_ids), unless the line carries its own prompt text.
"""
from __future__ import annotations

import argparse

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# Common words to build prompts from: real words tokenize like real text (about one token each).
WORDS = tuple("""the jitney leaves when it is full or has waited long enough and stops at every corner to pick up
riders drop them off again while driver counts fares city street morning evening rain sun bridge river market
station ticket window seat road map turn left right slow fast early late busy quiet old new small large red
green blue yellow house school garden light night day week year story number question answer because before
after under over between through""".split())


@dataclass
class TraceRequest:
    arrival_s: float        # seconds after the start of the replay
    prompt_tokens: int
    output_tokens: int      # forced length (ignore_eos)
    prompt: str | None = None


def save_trace(trace: list[TraceRequest], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in trace:
            d = asdict(r)
            if r.prompt is None:
                del d["prompt"]
            f.write(json.dumps(d) + "\n")


def load_trace(path: str | Path) -> list[TraceRequest]:
    with open(path) as f:
        trace = [TraceRequest(**json.loads(line)) for line in f if line.strip()]
    return sorted(trace, key=lambda r: r.arrival_s)


def _lengths(rng: random.Random, prompt_len: tuple[int, int], output_len: tuple[int, int]) -> tuple[int, int]:
    return rng.randint(*prompt_len), rng.randint(*output_len)


def poisson(n: int, rate: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
            seed: int = 0) -> list[TraceRequest]:
    """n requests at `rate` per second on average (exponential gaps, the first at t=0), uniform lengths."""
    rng, t, trace = random.Random(seed), 0.0, []
    for _ in range(n):
        trace.append(TraceRequest(round(t, 6), *_lengths(rng, prompt_len, output_len)))
        t += rng.expovariate(rate)
    return trace


def burst(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0) -> list[TraceRequest]:
    """n requests all at t=0: the engine's best case for batching, and its worst for the last request's wait."""
    rng = random.Random(seed)
    return [TraceRequest(0.0, *_lengths(rng, prompt_len, output_len)) for _ in range(n)]


def _word_ids(tokenizer, n_tokens: int, rng: random.Random) -> list[int]:
    # Each space-separated word is at least one token, so n_tokens words are always enough.
    text = " ".join(rng.choice(WORDS) for _ in range(n_tokens))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n_tokens, "the tokenizer merged words: give more text"
    return ids[:n_tokens]


def synth_prompt_ids(tokenizer, n_tokens: int, seed: int | str, shared_prefix: int = 0) -> list[int]:
    """Exactly n_tokens prompt ids, the same for the same seed. Different seeds differ from the first block on,
    so the prefix cache finds nothing, unless shared_prefix tokens are asked to be common to every seed
    (a system prompt)."""
    k = min(shared_prefix, n_tokens)
    return _word_ids(tokenizer, k, random.Random("shared")) + _word_ids(tokenizer, n_tokens - k, random.Random(seed))


# --- synthetic traces: arrival process x length distribution ---------------------------------------------------

ARRIVALS = ("poisson", "gamma")
LENGTH_DISTS = ("fixed", "uniform", "exponential", "azure")


def arrival_times(n: int, rate: float, process: str = "poisson", shape: float = 1.0, seed: int = 0) -> list[float]:
    """n arrival times (the first at t=0) at `rate` per second on average. Gamma gaps have the same mean and a
    coefficient of variation of 1/sqrt(shape): shape 1 is Poisson, shape < 1 bursty (clumps, then lulls)."""
    if process not in ARRIVALS:
        raise ValueError(f"unknown arrival process {process!r}: choose from {', '.join(ARRIVALS)}")
    rng, t, out = random.Random(f"{seed}:arrivals"), 0.0, []
    for _ in range(n):
        out.append(round(t, 6))
        t += rng.expovariate(rate) if process == "poisson" else rng.gammavariate(shape, 1 / (rate * shape))
    return out


def _draw(dist: str, lo_hi: tuple[int, int], rng: random.Random) -> int:
    lo, hi = lo_hi
    if dist == "fixed":
        return (lo + hi) // 2
    if dist == "uniform":
        return rng.randint(lo, hi)
    # exponential: mean at the midpoint, clipped into [lo, hi] (a long tail, like real request lengths)
    return min(hi, max(lo, round(rng.expovariate(2 / (lo + hi)))))


def lengths(n: int, dist: str, prompt_len: tuple[int, int] | None, output_len: tuple[int, int] | None,
            seed: int = 0, empirical: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """n (prompt, output) token counts. 'azure' draws pairs jointly from `empirical` (so long prompts keep their
    own outputs) and clips them into the ranges when given; the others draw each length within LO,HI."""
    if dist not in LENGTH_DISTS:
        raise ValueError(f"unknown length distribution {dist!r}: choose from {', '.join(LENGTH_DISTS)}")
    rng = random.Random(f"{seed}:lengths")
    if dist == "azure":
        def clip(v: int, r: tuple[int, int] | None) -> int:
            return v if r is None else min(r[1], max(r[0], v))
        return [(clip(p, prompt_len), clip(o, output_len)) for p, o in (rng.choice(empirical) for _ in range(n))]
    return [(_draw(dist, prompt_len, rng), _draw(dist, output_len, rng)) for _ in range(n)]


def synthetic(n: int, rate: float, prompt_len: tuple[int, int] | None, output_len: tuple[int, int] | None,
              process: str = "poisson", shape: float = 1.0, dist: str = "uniform", seed: int = 0,
              empirical: list[tuple[int, int]] | None = None) -> list[TraceRequest]:
    """Arrivals and lengths come from separate seeded streams, so traces at different rates hold the very same
    requests (a rate sweep changes when they come, nothing else)."""
    return [TraceRequest(t, p, o) for t, (p, o) in
            zip(arrival_times(n, rate, process, shape, seed), lengths(n, dist, prompt_len, output_len, seed, empirical))]


def offered_rate(trace: list[TraceRequest]) -> float | None:
    """Requests per second the trace offers: the mean gap's inverse (None for a burst: no gaps, no rate)."""
    span = trace[-1].arrival_s - trace[0].arrival_s if trace else 0.0
    return (len(trace) - 1) / span if span > 0 else None


def rescale_time(trace: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """Every arrival gap multiplied by factor (> 1 stretches: fewer requests per second); the first at 0."""
    t0 = trace[0].arrival_s if trace else 0.0
    return [TraceRequest(round((r.arrival_s - t0) * factor, 6), r.prompt_tokens, r.output_tokens, r.prompt)
            for r in trace]


def lo_hi(s: str) -> tuple[int, int]:
    """A length range from the command line: 'LO,HI' or 'N' (= N,N)."""
    parts = s.split(",")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"want LO,HI with 1 <= LO <= HI (or one N), got {s!r}")
    return lo, hi
