"""The Azure LLM inference trace (2023, conversation service): a window of it, scaled to fit a small machine.

The trace holds one hour of real arrivals with their context and generated token counts (no text): about
5.5 requests/s, contexts of median 1,020 tokens, outputs of median 129. A CPU serving a 135M model cannot keep
up with that, so a replay takes a window and two scales, and every figure made from it must name them:
time_scale stretches the arrival gaps (2 = half the request rate), token_scale divides every length (4 = a
quarter of the tokens). Patel et al., "Splitwise", ISCA 2024; CC-BY 4.0: the copy in benchmarks/data/ comes
with its licence and citation (benchmarks/data/README.md).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .trace import TraceRequest

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "azure_llm_2023_conv.csv"  # shipped with the package


def find_trace(path: str | Path | None = None) -> Path:
    p = Path(path) if path else DEFAULT_PATH
    if not p.is_file():
        raise FileNotFoundError(f"Azure trace not found at {p}: give the path of a CSV with the columns TIMESTAMP, "
                                f"ContextTokens, GeneratedTokens (the default is {DEFAULT_PATH})")
    return p


@lru_cache(maxsize=4)
def _load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds since the first request, context tokens, generated tokens), in arrival order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    stamps = np.array([r["TIMESTAMP"] for r in rows], dtype="datetime64[ns]")
    seconds = (stamps - stamps[0]).astype(np.int64) / 1e9
    context = np.array([int(r["ContextTokens"]) for r in rows])
    generated = np.array([int(r["GeneratedTokens"]) for r in rows])
    order = np.argsort(seconds, kind="stable")
    return seconds[order], context[order], generated[order]


def scale_tokens(n: int, token_scale: float) -> int:
    return max(1, round(n / token_scale))


@dataclass
class AzureTrace:
    requests: list[TraceRequest]
    start_s: float          # the window, in the trace's own seconds (before time scaling)
    duration_s: float
    time_scale: float       # arrival gaps were multiplied by this
    token_scale: float      # lengths were divided by this
    max_prompt_tokens: int | None

    def describe(self) -> str:
        n = len(self.requests)
        rate = n / (self.duration_s * self.time_scale) if self.duration_s else float("nan")
        clip = f", prompts clipped at {self.max_prompt_tokens}" if self.max_prompt_tokens else ""
        return (f"Azure LLM conversation trace 2023, window {self.start_s:g}..{self.start_s + self.duration_s:g} s "
                f"({n} requests), time scale {self.time_scale:g} (gaps x{self.time_scale:g}: {rate:.2f} req/s "
                f"offered), token scale {self.token_scale:g} (lengths / {self.token_scale:g}){clip}")


def azure_trace(path: str | Path | None = None, start_s: float = 0.0, duration_s: float | None = None,
                max_requests: int | None = None, time_scale: float = 1.0, token_scale: float = 1.0,
                max_prompt_tokens: int | None = None) -> AzureTrace:
    """The requests arriving in [start_s, start_s + duration_s) of the trace (at most max_requests of them),
    re-timed so the first arrives at 0, gaps times time_scale, lengths divided by token_scale (at least 1 token)
    and prompts clipped at max_prompt_tokens (to fit a model's context)."""
    if time_scale <= 0 or token_scale <= 0:
        raise ValueError("time_scale and token_scale must be positive")
    seconds, context, generated = _load(find_trace(path))
    end = seconds[-1] + 1e-9 if duration_s is None else start_s + duration_s
    idx = np.flatnonzero((seconds >= start_s) & (seconds < end))[:max_requests]
    if not idx.size:
        raise ValueError(f"no requests in the window {start_s:g}..{end:g} s (the trace spans {seconds[-1]:.0f} s)")
    if max_requests is not None and idx.size == max_requests:  # the window ends at the last request taken
        end = seconds[idx[-1]] + 1e-9
    t0 = seconds[idx[0]]
    requests = []
    for i in idx:
        prompt = scale_tokens(int(context[i]), token_scale)
        if max_prompt_tokens:
            prompt = min(prompt, max_prompt_tokens)
        requests.append(TraceRequest(round(float(seconds[i] - t0) * time_scale, 6), prompt,
                                     scale_tokens(int(generated[i]), token_scale)))
    return AzureTrace(requests, start_s, float(end - start_s), time_scale, token_scale, max_prompt_tokens)


def azure_lengths(path: str | Path | None = None, token_scale: float = 1.0) -> list[tuple[int, int]]:
    """Every (context, generated) pair of the trace, scaled: the empirical length distribution."""
    _, context, generated = _load(find_trace(path))
    return [(scale_tokens(int(c), token_scale), scale_tokens(int(g), token_scale)) for c, g in zip(context, generated)]
