"""Synthetic workloads: Poisson or gamma-bursty arrivals at a rate, or vLLM's burst (everything at t=0), with
lengths drawn from a distribution (uniform, fixed, exponential, or the Azure trace's own pairs)."""
from __future__ import annotations

import argparse
import os

from ..azure import azure_lengths
from ..trace import TraceRequest, burst, synthetic
from .base import Workload

# The policy comparison's trace: ~2,200 prompt and ~2,200 output tokens/s offered, more than continuous
# batching serves with the default model on 2 cores, so every policy builds a queue for the whole trace.
RATED = dict(num_requests=200, rate=16.0, prompt_len=(16, 256), output_len=(8, 256))
# vLLM's benchmark shape, and what vLLM's CPU build (0.32, C++ kernels) served on it on a machine of the
# development machine's type (AMD EPYC Zen 4, 2 cores, AVX512-BF16): a published figure, not re-run here (no
# CPU build of vLLM installs from the registries this project reaches).
BURST = dict(num_requests=128, prompt_len=(32, 512), output_len=(16, 256))
VLLM_BURST_TOK_S = {"in-process": 540.0, "over HTTP": 435.0}
VLLM_MACHINE = "an AMD EPYC Zen 4 VM (2 cores, AVX-512, AVX512-BF16)"


def gamma_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--gamma-shape", type=float, default=0.25,
                   help="gamma: shape k, gaps' CV = 1/sqrt(k); 1 = Poisson, < 1 burstier (default: 0.25)")


def _span(r: tuple[int, int] | None) -> str:
    return "any" if r is None else f"{r[0]}..{r[1]}"


def _lengths(args: argparse.Namespace) -> str:
    dist = (f"(prompt, output) pairs drawn from the Azure trace / token scale {args.token_scale:g}"
            if args.length_dist == "azure" else f"{args.length_dist} lengths")
    return (f"{dist}, prompts {_span(args.prompt_len)} tokens, outputs {_span(args.output_len)} tokens "
            f"(forced, greedy)")


def _arrivals(process: str):
    def at_rate(args: argparse.Namespace, rate: float) -> list[TraceRequest]:
        """Arrivals are redrawn at the new rate; the requests (lengths, prompts) stay the same."""
        empirical = azure_lengths(args.azure_path, args.token_scale) if args.length_dist == "azure" else None
        return synthetic(args.num_requests, rate, args.prompt_len, args.output_len, process,
                         getattr(args, "gamma_shape", 1.0), args.length_dist, args.seed, empirical)

    def build(args: argparse.Namespace) -> tuple[list[TraceRequest], str]:
        rate = "swept rates" if getattr(args, "sweep_rates", None) else f"{args.rate:g} req/s"
        kind = "Poisson" if process == "poisson" else f"gamma (shape {args.gamma_shape:g})"
        return (at_rate(args, args.rate),
                f"{process}: {args.num_requests} requests, {kind} arrivals at {rate}, {_lengths(args)}")
    return build, at_rate


def _burst(args: argparse.Namespace) -> tuple[list[TraceRequest], str]:
    return (burst(args.num_requests, args.prompt_len, args.output_len, args.seed),
            f"burst: {args.num_requests} requests all at t=0, prompts {_span(args.prompt_len)} tokens, "
            f"outputs {_span(args.output_len)} tokens (uniform, forced, greedy)")


def _vllm_reference(args: argparse.Namespace) -> str | None:
    """vLLM's figure, only for the very workload and dtype it was measured on."""
    same = all(getattr(args, k) == v for k, v in BURST.items()) and args.seed == 0
    if not (same and args.dtype in ("auto", "bfloat16") and (args.url or "continuous" in args.policies)):
        return None
    from ..machine import cpu_model
    where = "over HTTP" if args.url or args.start_server else "in-process"
    # Measured on another machine, at another time: said so, beside this one's name, and never in the tables
    # above as if it were a run of this bench.
    return (f"measured elsewhere, not by this run: vLLM 0.32's CPU build served this burst at "
            f"{VLLM_BURST_TOK_S[where]:.0f} output tok/s {where} on {VLLM_MACHINE} (a published figure, never "
            f"re-run here); this run's machine: {cpu_model()}, {os.cpu_count()} cores. Machines differ: compare "
            f"the two only on the same one")


_poisson_build, _poisson_at = _arrivals("poisson")
_gamma_build, _gamma_at = _arrivals("gamma")
POISSON = Workload("poisson", "Poisson arrivals at --rate (the policy comparison's preset)", _poisson_build,
                   RATED, at_rate=_poisson_at)
GAMMA = Workload("gamma", "gamma arrivals: Poisson's mean rate, burstier gaps", _gamma_build, RATED,
                 gamma_args, _gamma_at)
BURST_WORKLOAD = Workload("burst", "vLLM's benchmark shape: every request at t=0", _burst, BURST,
                          reference=_vllm_reference)
