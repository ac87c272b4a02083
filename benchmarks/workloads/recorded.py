"""Recorded workloads: a window of the Azure LLM conversation trace (scaled), or any trace saved as JSONL."""
from __future__ import annotations

import argparse

from ..azure import azure_trace
from ..trace import TraceRequest, load_trace, offered_rate
from .base import Workload


def azure_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--azure-path", help="the trace CSV (default: the copy in benchmarks/data/)")
    g.add_argument("--azure-start-s", type=float, default=0.0, help="azure: window start, trace seconds (default: 0)")
    g.add_argument("--azure-duration-s", type=float, help="azure: window length, trace seconds (default: to the end)")
    g.add_argument("--max-requests", type=int, help="azure: at most this many requests from the window")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="azure: arrival gaps x this, 2 = half the rate (default: 1)")
    g.add_argument("--token-scale", type=float, default=1.0,
                   help="azure window and --length-dist azure: lengths / this (default: 1)")
    g.add_argument("--max-prompt-tokens", type=int, help="azure: clip prompts to fit the model's context")


def _azure(args: argparse.Namespace) -> tuple[list[TraceRequest], str]:
    at = azure_trace(args.azure_path, args.azure_start_s, args.azure_duration_s, args.max_requests,
                     args.time_scale, args.token_scale, args.max_prompt_tokens)
    return at.requests, at.describe()


def _jsonl(args: argparse.Namespace) -> tuple[list[TraceRequest], str]:
    trace = load_trace(args.trace)
    rate = offered_rate(trace)
    return trace, f"trace {args.trace}: {len(trace)} requests, " + (f"{rate:.2f} req/s offered" if rate
                                                                    else "all at once")


AZURE = Workload("azure", "a window of the Azure LLM conversation trace, scaled", _azure, add_args=azure_args)
JSONL = Workload("trace", "the JSONL trace given with --trace (e.g. one saved by --save-trace)", _jsonl)
