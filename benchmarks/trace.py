"""Traces: when each request arrives and how long its prompt and output are, as JSONL, plus synthetic ones.

A trace holds lengths, not text, so one trace serves any tokenizer: replay makes each prompt of exactly
prompt_tokens tokens (synth_prompt_ids), unless the line carries its own prompt text.
"""
from __future__ import annotations

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
