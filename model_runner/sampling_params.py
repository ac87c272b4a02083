"""Per-request sampling parameters and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from model_runner.errors import InvalidSamplingParams

# Temperatures below this are treated as greedy: dividing logits by them overflows float32 to inf, and the
# distribution is a point mass on the argmax anyway (the same cut-off vLLM uses).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's bound for chat's top_logprobs)
# A grammar (the API's response_format) ends the output with end-of-sequence as soon as its document is complete, so
# nothing may hold end-of-sequence back: with one, each of these fields must keep its "off" value. The one statement
# of the rule and its message: validate() checks it, and the API's body rules and OpenAPI document are built from
# it (api/fields.py RULES).
GRAMMAR_EXCLUDES = {"ignore_eos": False, "min_tokens": 0}


class Bound(NamedTuple):
    """A numeric field's allowed range, inclusive unless open_lo; None = unbounded on that side."""
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False

    def holds(self, x: float) -> bool:
        return ((self.lo is None or (x > self.lo if self.open_lo else x >= self.lo))
                and (self.hi is None or x <= self.hi))

    def __str__(self) -> str:
        """e.g. "in (0, 1]", ">= 0": what an error message says the value must be."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}]"
        if self.lo is not None:
            return f"{'>' if self.open_lo else '>='} {self.lo:g}"
        return f"<= {self.hi:g}" if self.hi is not None else ""


# The sampling fields' bounds, declared once: SamplingParams.validate checks them, and the API's field tables
# (api/fields.py), hence its 422s and /openapi.json, are built from them, so the engine and the published contract
# cannot disagree. They are the ones docs/serving.md promises. max_tokens and min_tokens have no fixed bound (the
# context window and max_tokens bound them), so they are checked in validate() alone.
BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0, open_lo=True),
    "top_k": Bound(-1, 1 << 20),               # -1 and 0 mean off
    "seed": Bound(0, 2**63 - 1),
    "repetition_penalty": Bound(0.1, 10.0),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "min_p": Bound(0.0, 1.0),
    "logprobs": Bound(0, MAX_LOGPROBS),
    "prompt_logprobs": Bound(0, MAX_LOGPROBS),
}
LOGIT_BIAS = Bound(-100.0, 100.0)  # each entry's bias


def grammar_excludes(name: str) -> str:
    """The error for a field of GRAMMAR_EXCLUDES set with a grammar."""
    return (f"'{name}' cannot be combined with a JSON response_format: the output ends (end-of-sequence) as soon as "
            "the JSON document is complete")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _is_bias(kv: object) -> bool:
    return (isinstance(kv, (tuple, list)) and len(kv) == 2 and _is_int(kv[0]) and kv[0] >= 0
            and _is_number(kv[1]) and LOGIT_BIAS.holds(kv[1]))


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 or -1 means off
    top_p: float = 1.0
    seed: int | None = None  # per-request seed: same seed + same prompt -> same text, whatever else is in the batch
    repetition_penalty: float = 1.0  # HF/CTRL: logits of seen tokens (prompt + output) divided by it if > 0, else multiplied
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, checked at text level by the engine
    ignore_eos: bool = False
    min_tokens: int = 0
    # OpenAI's penalties, over the counts of the tokens generated so far (the prompt does not count):
    # logit -= frequency_penalty * count + presence_penalty * (count > 0). Negative values encourage repeats.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), greedy rows included
    min_p: float = 0.0  # sampled rows: drop tokens whose probability is below min_p x the top token's; 0 = off
    # Log-probabilities from the raw model distribution (float32 log_softmax of the logits, before any processor:
    # vLLM's default "raw_logprobs"). None = off; N = the chosen token's and the N likeliest tokens' logprobs.
    logprobs: int | None = None          # for each generated token
    prompt_logprobs: int | None = None   # for each prompt token but the first (what scoring a text needs)
    # Constrained decoding: a compiled schema (model_runner.grammar.Grammar) the output must match; each sequence
    # follows it with its own matcher. The output then ends when the document is complete (end-of-sequence).
    grammar: object | None = None

    def __post_init__(self) -> None:
        # Requests arrive as JSON, so lists are normal here; a bare string is one stop string, not its characters.
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if isinstance(self.logit_bias, dict):  # {token id: bias}, as OpenAI's JSON has it (ids as ints here)
            self.logit_bias = tuple(self.logit_bias.items())

    @property
    def has_penalties(self) -> bool:
        """Presence or frequency penalties: the sampler needs this row's output token ids."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def validate(self) -> SamplingParams:
        """Raise InvalidSamplingParams (an InvalidRequestError) naming the first bad field and its allowed range;
        return self if all are good."""

        def check(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise InvalidSamplingParams(f"{field} must be {allowed}, got {getattr(self, field)!r}")

        # max_tokens 0 only scores the prompt: it needs prompt_logprobs, or there would be nothing to return.
        least = 0 if self.prompt_logprobs is not None else 1
        check(_is_int(self.max_tokens) and self.max_tokens >= least, "max_tokens",
              f"an integer >= {least}" + (" (0 only with prompt_logprobs)" if least else ""))
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"):
            check(_is_number(getattr(self, name)) and BOUNDS[name].holds(getattr(self, name)), name,
                  f"a finite number {BOUNDS[name]}")
        check(_is_int(self.top_k) and BOUNDS["top_k"].holds(self.top_k), "top_k",
              f"-1 or 0 (off), or an integer >= 1 (at most {BOUNDS['top_k'].hi:g})")
        check(self.seed is None or (_is_int(self.seed) and BOUNDS["seed"].holds(self.seed)), "seed",
              f"null or an integer {BOUNDS['seed']}")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "a list of integers >= 0")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean")
        check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              f"an integer in [0, max_tokens={self.max_tokens}]")
        check(isinstance(self.logit_bias, (tuple, list)) and all(_is_bias(kv) for kv in self.logit_bias),
              "logit_bias", f"pairs of (token id >= 0, bias {LOGIT_BIAS})")
        if self.grammar is not None and (held := [k for k, off in GRAMMAR_EXCLUDES.items() if getattr(self, k) != off]):
            raise InvalidSamplingParams(grammar_excludes(held[0]))
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            check(n is None or (_is_int(n) and BOUNDS[name].holds(n)), name, f"null or an integer {BOUNDS[name]}")
        return self
