"""Which replica serves a request: the decision alone, on plain data, so it is tested without Ray.

prefix       the replica holding the longest run of the prompt's leading full KV blocks (exact block hashes,
             batcher's own), unless that replica is overloaded next to the least-loaded candidate; the test is
             made for each candidate in turn (a shorter match on a replica with room beats a longer one on a
             busy replica), and only when every matching candidate is overloaded does the request fall back
             to power-of-two-choices. One global "max - min > threshold" switch, as in the routers we read,
             sends every request to p2c whenever any one replica lags, and loses the cache for all of them.
p2c          two candidates drawn at random, the lighter one first (load = queued + running requests, with a
             full KV cache weighing as much as `imbalance` requests).
round-robin  each candidate in turn.
The answer is an order: the first choice, then the fall-backs Ray Serve tries if the first is at its limit.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

POLICIES = ("prefix", "p2c", "round-robin")
DEFAULT_IMBALANCE = 8  # requests: how much busier than the least-loaded candidate a prefix match may be


@dataclass
class Candidate:
    key: str             # the replica's id
    load: int            # queued + running requests
    kv_usage: float      # fraction of its KV blocks in use
    matched: int = 0     # leading prompt blocks it holds

    def score(self, imbalance: float) -> float:
        return self.load + imbalance * self.kv_usage


@dataclass
class Decision:
    order: list[str]     # replica keys, the first choice first
    kind: str            # prefix_hit | prefix_spill | prefix_miss | p2c | round_robin
    matched_blocks: int = 0


def p2c(cands: list[Candidate], imbalance: float, rng: random.Random) -> list[str]:
    two = rng.sample(cands, min(2, len(cands)))
    two.sort(key=lambda c: c.score(imbalance))
    rest = sorted((c for c in cands if c not in two), key=lambda c: c.score(imbalance))
    return [c.key for c in two + rest]


def decide(policy: str, cands: list[Candidate], imbalance: float = DEFAULT_IMBALANCE,
           rng: random.Random | None = None, turn: int = 0) -> Decision:
    if not cands:
        return Decision([], policy)
    rng = rng or random.Random()
    if policy == "round-robin":
        i = turn % len(cands)
        return Decision([c.key for c in cands[i:] + cands[:i]], "round_robin")
    if policy == "p2c":
        return Decision(p2c(cands, imbalance, rng), "p2c")
    if policy != "prefix":
        raise ValueError(f"unknown routing policy {policy!r}: choose one of {', '.join(POLICIES)}")
    least = min(c.score(imbalance) for c in cands)
    matching = sorted((c for c in cands if c.matched), key=lambda c: (-c.matched, c.score(imbalance)))
    for c in matching:
        if c.score(imbalance) - least <= imbalance:
            rest = [k for k in p2c(cands, imbalance, rng) if k != c.key]
            return Decision([c.key] + rest, "prefix_hit", c.matched)
    return Decision(p2c(cands, imbalance, rng), "prefix_spill" if matching else "prefix_miss")


def leading_matches(prompt_hashes: list[int], held) -> int:
    """How many of the prompt's leading block hashes are in `held` (a chain: it stops at the first miss)."""
    n = 0
    for h in prompt_hashes:
        if h not in held:
            break
        n += 1
    return n
