"""`jitney plan`: the cheapest fleet that serves a workload within its SLOs, found by simulation.

For every configuration of the search space (device, tensor parallelism, weights, policy, max_num_seqs,
max_num_batched_tokens) it finds the highest request rate one replica sustains within the SLOs (TTFT p90, ITL
p99), by bisection over simulations of jitney's own scheduler on the device's modelled step cost (sim/probe.py,
sim/search.py); then the replicas a --target-rate needs, the fleet's $/hour and $/M output tokens, cheapest
first (sim/fleet.py), and a plot of fleet cost against the target rate. SIMULATED, not measured.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from batcher.config import POLICIES, BatcherConfig
from benchmarks import bench
from benchmarks.replay import prompt_ids
from benchmarks.trace import save_trace
from benchmarks.workloads import WORKLOADS, WorkloadError

from . import fleet
from .cost import WEIGHT_BYTES
from .hardware import DEVICES
from .models import SHAPES, model_config
from .prices import PRICES, price_flag, prices
from .probe import Config, Outcome, Setup, search_config, sheet_cost
from .runner import GPU_BUDGET, SimTokenizer
from .search import probes_needed

# Few requests per probe (bench replays 200): ~50 configurations search in minutes on 2 cores (docs/simulation.md
# has the measured time). Fewer requests make each percentile coarser (p90 of 100 is the 90th request); the
# ceiling at the saturated rate bounds what a short probe cannot see (sim/probe.py).
PROBE_REQUESTS = 100
PLAN_HELP = {
    "num_requests": f"synthetic workloads: requests per probe (default for plan: {PROBE_REQUESTS}, where jitney bench "
                    "replays 200: more is slower and resolves the percentiles more finely)",
    "rate": "not for plan (refused): the search sets the rate",
    "quick": "not for plan (refused): give --num-requests to shorten the probes",
    "save_trace": "write the workload's requests (at their preset rate; the probes retime them) to this JSONL file",
}
DEFAULT_WEIGHTS = ["bfloat16", "int8", "int4"]
TP_DEGREES = [1, 2, 4, 8]


def words(choices: list[str]) -> Callable[[str], list[str]]:
    def parse(s: str) -> list[str]:
        got = [w.strip() for w in s.split(",") if w.strip()]
        if not got or (unknown := [w for w in got if w not in choices]):
            raise argparse.ArgumentTypeError(f"want a comma-separated list from {', '.join(choices)}; got {s!r}"
                                             + (f" ({', '.join(unknown)} unknown)" if got else ""))
        return got
    return parse


def positive_ints(s: str) -> list[int]:
    try:
        got = [int(v) for v in s.split(",")]
    except ValueError:
        got = []
    if not got or min(got) < 1:
        raise argparse.ArgumentTypeError(f"want comma-separated integers >= 1, got {s!r}")
    return got


def build_parser() -> argparse.ArgumentParser:
    from api.parser import Parser
    from .simulate import add_efficiency_args
    p = Parser(prog="jitney plan", error_prefix="jitney plan", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="what it searches, how, and its assumptions: docs/simulation.md#jitney-plan")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="story-6b", help=f"{' | '.join(SHAPES)} | a Hugging Face config.json (or "
                                                       "its folder) | a model jitney serves (default: story-6b)")
    m.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                   help="compute dtype of int8 / int4 weights (float weights compute in their own dtype; the KV "
                        "cache is in the compute dtype) (default: bfloat16)")
    s = p.add_argument_group("search space (comma-separated lists: every combination is one configuration)")
    s.add_argument("--devices", type=words(list(DEVICES)), default=list(DEVICES),
                   help=f"devices from the hardware sheet (default: all: {','.join(DEVICES)})")
    s.add_argument("--tp", type=positive_ints, default=TP_DEGREES,
                   help=f"tensor-parallel degrees: devices per replica (default: {','.join(map(str, TP_DEGREES))})")
    s.add_argument("--weights", type=words(list(WEIGHT_BYTES)), default=DEFAULT_WEIGHTS,
                   help=f"weights as stored, from {', '.join(WEIGHT_BYTES)} (int8 / int4: weight-only "
                        f"quantization, matmuls in --dtype) (default: {','.join(DEFAULT_WEIGHTS)})")
    s.add_argument("--policies", dest="policy_list", metavar="POLICIES", type=words(POLICIES), default=["continuous"],
                   help=f"batching policies, from {','.join(POLICIES)} (default: continuous, the server's)")
    defaults = BatcherConfig()
    s.add_argument("--max-num-seqs", type=positive_ints, default=[defaults.max_num_seqs],
                   help=f"continuous: sequences running at once (default: {defaults.max_num_seqs}, the server's)")
    s.add_argument("--max-num-batched-tokens", type=positive_ints, default=[GPU_BUDGET[0]],
                   help=f"tokens in one step, longer prompts chunked (default: {GPU_BUDGET[0]}, the server's on a "
                        "GPU)")
    d = p.add_argument_group("the devices' step cost (the hardware sheet's, as for jitney simulate)")
    add_efficiency_args(d)
    o = p.add_argument_group("SLOs, prices, target")
    o.add_argument("--slo-ttft-p90-ms", type=float, default=2000.0,
                   help="90 %% of requests see their first token within this (default: 2000, Vidur-Search's)")
    o.add_argument("--slo-itl-p99-ms", type=float, default=200.0,
                   help="99 %% of the gaps between tokens (all requests' pooled) within this (default: 200, "
                        "Vidur-Search's TBT)")
    o.add_argument("--price", action="append", type=price_flag, metavar="DEVICE=USD",
                   help="USD per hour of one device, e.g. a100-80gb=3.67 (repeat per device); defaults: AWS "
                        "on-demand list prices per GPU (sim/prices.py): " +
                        ", ".join(f"{n} {usd:.2f}" for n, (usd, _) in PRICES.items()))
    o.add_argument("--target-rate", type=float, default=3000.0,
                   help="requests/s the fleet must serve (default: 3000, the story's)")
    o.add_argument("--tolerance", type=float, default=0.05,
                   help="bisection stops when the highest passing rate is within this fraction of the lowest "
                        "failing one (default: 0.05)")
    bench.add_workload_args(p)
    for action in p._actions:  # bench's workload flags, as plan reads them
        if action.dest in PLAN_HELP:
            action.help = PLAN_HELP[action.dest]
    # bench.resolve reads the server settings too: plan has none to give (its knobs are the search space).
    own = {a.dest for a in p._actions}
    p.set_defaults(kv_cache_memory=None, no_prefix_caching=False, **{k: None for k in bench.KNOBS if k not in own})
    r = p.add_argument_group("running and output")
    r.add_argument("--jobs", type=int, default=1, help="configurations searched at once, one process each "
                                                      "(default: 1; results do not depend on it)")
    r.add_argument("--out", help="output folder (default: a new jitney-plan-<timestamp>-* folder in the system's "
                                 "temporary directory)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.rate is not None:
        p.error("the search sets the rate: leave out --rate")
    if args.quick:
        p.error("--quick is jitney bench's smoke run: give --num-requests to shorten the probes")
    if args.workload == "burst":
        p.error("a burst arrives all at once: it has no rate to search (use poisson, gamma, azure or --trace)")
    if not args.trace and args.num_requests is None and "num_requests" in WORKLOADS[args.workload].presets:
        args.num_requests = PROBE_REQUESTS
    for name in ("target_rate", "tolerance", "slo_ttft_p90_ms", "slo_itl_p99_ms"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    bench.resolve(p, args)
    return args


def configurations(args: argparse.Namespace) -> list[Config]:
    """The search space in the order of the flags. max_num_seqs is continuous batching's alone (the others batch
    max_batch_size): another policy gets one configuration, not one per value."""
    out: dict[Config, None] = {}
    for device, tp, weights, policy, seqs, tokens in itertools.product(
            args.devices, args.tp, args.weights, args.policy_list, args.max_num_seqs, args.max_num_batched_tokens):
        seqs = seqs if policy == "continuous" else BatcherConfig.max_num_seqs
        out.setdefault(Config(device, tp, weights, policy, seqs, tokens))
    return list(out)


def _search(item):  # a worker's task: module-level, so --jobs can pickle it
    cfg, setup, cost_for = item
    return search_config(cfg, setup, cost_for)


def search_all(configs: list[Config], setup: Setup, cost_for, jobs: int, progress: bool) -> list[Outcome]:
    """Every configuration's outcome, in the order given, with a progress bar over configurations."""
    items = [(c, setup, cost_for) for c in configs]
    bar = tqdm(total=len(items), desc="plan", unit="config", disable=not progress)
    try:
        if jobs == 1:
            outcomes = []
            for item in items:
                bar.set_postfix_str(item[0].label)  # the configuration being searched
                outcomes.append(_search(item))
                bar.update()
            return outcomes
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        # spawn: a fresh interpreter per worker (forking a process with threads running is unsafe).
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = []
            for o in pool.map(_search, items):
                outcomes.append(o)
                bar.update()
            return outcomes
    finally:
        bar.close()


def header(args: argparse.Namespace, setup: Setup, trace_desc: str, table: dict, n: int) -> str:
    price = ", ".join(f"{d} ${table[d][0]:.2f} ({table[d][1]})" for d in args.devices)
    space = (f"devices {','.join(args.devices)}; tp {','.join(map(str, args.tp))}; weights {','.join(args.weights)} "
             f"(int8/int4 computing in {args.dtype}); policies {','.join(args.policy_list)}; max_num_seqs "
             f"{','.join(map(str, args.max_num_seqs))}; max_num_batched_tokens "
             f"{','.join(map(str, args.max_num_batched_tokens))}: {n} configurations")
    return (f"# jitney plan\n\nSIMULATED, not measured: jitney's scheduler on modelled devices (docs/simulation.md; "
            f"hardware-sheet efficiencies assumed: {args.compute_efficiency:g} of the FLOP/s peak, "
            f"{args.memory_efficiency:g} of the bandwidth, {args.step_overhead_ms:g} ms per step, "
            f"{args.seq_overhead_us:g} us per sequence)\nmodel: {setup.model}\nworkload: {trace_desc}; seed "
            f"{args.seed}; each probe replays these {len(setup.trace)} requests at the rate under test\n"
            f"SLOs: TTFT p90 <= {args.slo_ttft_p90_ms:g} ms, ITL p99 <= {args.slo_itl_p99_ms:g} ms; bisection to "
            f"{args.tolerance:.0%} (about {probes_needed(args.tolerance)} probes per configuration), under the "
            f"saturated rate\nsearch space: {space}\nprices per device-hour: {price}\ntarget: "
            f"{args.target_rate:g} req/s")


def run_plan(argv: list[str] | None = None, cost_for=sheet_cost) -> dict:
    """Runs the search; returns what results.json holds. cost_for: (Config, Setup) -> (cost model, KV blocks)."""
    args = parse_args(argv)
    started = time.time()
    trace, trace_desc = WORKLOADS[args.workload].build(args)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    mc = model_config(args.model)
    longest = max(r.prompt_tokens + r.output_tokens for r in trace)
    if longest > mc.max_position_embeddings:
        raise ValueError(f"a request of the workload needs {longest:,} tokens, more than {args.model}'s context of "
                         f"{mc.max_position_embeddings:,}: shorten --prompt-len / --output-len")
    ids = prompt_ids(SimTokenizer(mc.vocab_size), trace, args.seed, args.shared_prefix)
    setup = Setup(args.model, mc, args.dtype, args, trace, ids, args.slo_ttft_p90_ms, args.slo_itl_p99_ms,
                  args.tolerance, args.compute_efficiency, args.memory_efficiency, args.step_overhead_ms / 1e3,
                  args.seq_overhead_us / 1e6)
    configs = configurations(args)
    table = prices(args.price)
    out = Path(args.out or tempfile.mkdtemp(prefix=f"jitney-plan-{time.strftime('%Y%m%d-%H%M%S')}-"))
    out.mkdir(parents=True, exist_ok=True)
    outcomes = search_all(configs, setup, cost_for, args.jobs, not args.no_progress)
    mean_out = sum(r.output_tokens for r in trace) / len(trace)
    rows = fleet.ranked(outcomes, table, args.target_rate, mean_out)
    head = header(args, setup, trace_desc, table, len(configs))
    wall = time.time() - started
    report = (f"{head}\n\n{fleet.summary(rows, args.target_rate)}\n\n{fleet.table(rows, args.target_rate)}\n\n"
              f"fleet: n replicas serve n x one replica's rate (an even split of the arrivals); $/M output tokens "
              f"at the target rate, {mean_out:,.0f} output tokens per request\ntotal {wall:,.0f} s wall for "
              f"{len(configs)} configurations ({sum(len(o.probes) + 1 for o in outcomes)} simulations)")
    print("\n" + report)
    (out / "report.md").write_text(report + "\n")
    png = fleet.plot(rows, args.target_rate, out / "fleet_cost.png",
                     f"jitney plan, SIMULATED: {args.model}, {args.workload} workload, TTFT p90 <= "
                     f"{args.slo_ttft_p90_ms:g} ms, ITL p99 <= {args.slo_itl_p99_ms:g} ms")
    result = dict(argv=sys.argv[1:] if argv is None else argv, header=head, wall_s=wall, mean_output_tokens=mean_out,
                  rows=[dict(asdict(o), label=o.config.label, fleet=asdict(f) if f else None) for o, f in rows])
    (out / "results.json").write_text(json.dumps(result))
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}, {png.name}")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_plan(argv)
    except (WorkloadError, FileNotFoundError, ValueError) as e:
        print(f"jitney plan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
