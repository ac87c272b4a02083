"""`jitney simulate --calibrate`: time real engine steps on this host and fit the roofline cost model to them.

Two ways to get the steps:
  in situ (the default; insitu.py): the real Engine serves a short workload and every step it runs is a sample,
      its plan as the scheduler made it and its seconds as the engine lived them (the step on the torch thread
      beside the event loop's work, and the host work after it);
  isolated (--isolated): a small grid of hand-built steps (decodes at several batch sizes and contexts, prompt
      chunks of several lengths, one mixed step) through the real ModelRunner alone, each the median of a few
      timed runs after an untimed one that pays for oneDNN's first sight of a shape.
fit() then finds the rates and terms whose modelled costs best match (least squares; in situ, weighted, see
fit_in_situ), and the result is saved as JSON for `jitney simulate --cost-model FILE`.
"""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np

from batcher.generate import kv_manager
from benchmarks.machine import cpu_model
from model_runner.config import RunnerConfig
from model_runner.precision import dtype_name
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

from . import insitu
from .cost import RooflineCost, RooflineParams, StepPlan, Work, fit
from .models import CALIBRATION_KIND

# (prompt-chunk lengths, decode batch, decode context): every step of the grid.
GRID = ([((), b, c) for b in (1, 4, 16, 48) for c in (64, 384)]
        + [((n,), 0, 0) for n in (16, 64, 256)] + [((64,), 16, 128)])
QUICK_GRID = [((), 1, 32), ((), 8, 32), ((16,), 0, 0), ((64,), 0, 0), ((16,), 4, 32)]
QUANT_WEIGHTS = {"int8": "int8", "q4": "int4"}  # q4's Q4_0/Q4_1 blocks: 18-20 B per 32 weights, int4's bytes


def _step(runner: ModelRunner, prefills: tuple[int, ...], batch: int, context: int, vocab: int
          ) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
    """Sequences holding their blocks, and the step: each prompt chunk from position 0, each decode at context."""
    seqs, scheduled, kv = [], [], kv_manager(runner)
    for i, n in enumerate([*prefills, *[context] * batch]):
        seq = Sequence([(7 * i + j) % (vocab - 1) + 1 for j in range(n)], SamplingParams(max_tokens=1))
        if not kv.allocate_slots(seq, n):
            raise ValueError("the calibration grid does not fit the KV cache")
        is_decode = i >= len(prefills)
        seq.num_computed_tokens = n - 1 if is_decode else 0
        seqs.append(seq)
        scheduled.append((seq, 1 if is_decode else n))
    return scheduled, seqs


def grid_samples(runner: ModelRunner, work: Work, repeats: int, quick: bool, progress: bool) -> list[dict]:
    """The isolated grid: each step built by hand and timed alone through runner.execute."""
    samples = []
    for prefills, batch, context in QUICK_GRID if quick else GRID:
        scheduled, _ = _step(runner, prefills, batch, context, runner.model_config.vocab_size)
        plan = StepPlan.of(scheduled)
        runner.execute(scheduled)  # untimed: oneDNN picks its kernels on the first sight of a shape
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.execute(scheduled)
            times.append(time.perf_counter() - t0)
        samples.append(dict(prefill=list(prefills), decode_batch=batch, decode_context=context, plan=plan.to_dict(),
                            flops=work.flops(plan), bytes=work.bytes(plan), seqs=plan.num_seqs,
                            seconds=statistics.median(times)))
        if progress:
            print(f"  step: prompt chunks {list(prefills) or '-'}, {batch} decodes at context {context}: "
                  f"{samples[-1]['seconds'] * 1e3:.1f} ms", flush=True)
    return samples


def in_situ_samples(steps: list[insitu.StepSample], work: Work) -> list[dict]:
    """The engine's steps (insitu.collect) as the fit and the JSON take them."""
    return [dict(phase=s.phase, plan=s.plan.to_dict(), flops=work.flops(s.plan), bytes=work.bytes(s.plan),
                 seqs=s.plan.num_seqs, attention_flops=work.attention_flops(s.plan), seconds=s.seconds,
                 step_seconds=s.step_s, host_seconds=s.host_s, idle_after=s.idle_after, others_cpu=s.others_cpu)
            for s in steps]


# --- the in-situ fit ----------------------------------------------------------------------------------------
#
# The model's form is the sheet devices' (cost.py: max(compute, bytes) + per step + per sequence) and one term
# more, fitted only here: attention's FLOPs at a rate of their own. Candidate terms were tried on four in-situ
# runs on the development machine (AMD EPYC Zen 4, 2 cores, SmolLM2-135M in bfloat16, 300-320 steps each, the
# last with the cores to itself). A cost per token fed, per prompt token, per prompt chunk, per sampled row or
# per decode came out at 0 in every run, or changed the weighted squared error by under 1 % (the non-negative
# fit drops them: the FLOP term already grows with tokens and the sequence term with rows). A cost per attention
# FLOP beyond the FLOP rate lowered it by 3, 8, 17 and 28 % (the quiet run: prompt chunks' median error 5.3 ->
# 4.1 %; in a noisier one the mixed steps' 12 -> 9 %): jitney's attention kernel runs at 85-140 GFLOP/s where the
# matmuls reach 260-360, so long contexts cost more than their FLOPs at the matmul rate say (a 512-token chunk
# after a 512-token cached prefix: 558 ms modelled without the term, 650 ms with it, 618-713 ms measured). It
# earns its parameter; the others do not. What is left (a median step error of 4.6 % on the quiet machine,
# 8 % on a shared one) is the host's noise from step to step and minute to minute.
OUTLIER_MADS = 3.0       # a step further than this many scaled median errors off the fit is a disturbance ...
OUTLIER_FLOOR = 0.10     # ... and never one within 10 %
OUTLIER_CEILING = 0.50   # ... and always one beyond 50 % (when most steps are disturbed, their spread is no guide)
# The report warns (calibrate again, on a quiet machine) when more steps than BUSY_STEPS were left out, when other
# processes used more than BUSY_CPU_PCT % of the CPUs meanwhile, or when the fit's median error exceeds POOR_FIT.
BUSY_STEPS, BUSY_CPU_PCT, POOR_FIT = 0.10, insitu.BUSY_PCT, 0.20
MAD_SCALE = 1.4826       # a median absolute deviation x this estimates a normal distribution's sigma


def shape_cell(plan: StepPlan) -> tuple[int, int, int]:
    """Steps alike enough to count as one measurement: decodes, prompt tokens and longest context in powers of 2
    (contexts in 64-token units)."""
    prompt = sum(n for n, _ in plan.prefill)
    context = max([*plan.decode, *(c for _, c in plan.prefill)], default=0)
    return len(plan.decode).bit_length(), prompt.bit_length(), (context // 64).bit_length()


def fit_in_situ(samples: list[dict]) -> tuple[RooflineParams, np.ndarray, np.ndarray]:
    """fit() over in-engine steps: (params, each sample's weight, which samples the fit kept).

    Weights. An engine's steps are mostly alike (a burst of 64 decodes 64-wide a dozen times, and ends in a
    tail of small batches), so plain least squares would fit whatever shape happens to be common, and in
    seconds, the long steps: a 500 ms prompt chunk's 5 % outweighs a 25 ms decode's 50 %. The simulator is
    judged on latencies relative to the real ones, so each step's error is taken relative to its time (weight
    1 / t^2), and each shape cell (shape_cell) weighs as one: its steps share a weight of 1.
    Disturbances. A step the host interrupted (another process, a page fault storm) can take several times its
    shape's time; after a first fit, steps further off than OUTLIER_MADS scaled median errors (and at least
    OUTLIER_FLOOR, and always beyond OUTLIER_CEILING) are left out and the fit redone, up to three times. What is
    left out is counted and saved."""
    f, b, s, a, t = (np.array([x[k] for x in samples], dtype=float)
                     for k in ("flops", "bytes", "seqs", "attention_flops", "seconds"))
    cells = [shape_cell(StepPlan.from_dict(x["plan"])) for x in samples]

    def weighted_fit(keep: np.ndarray) -> tuple[RooflineParams, np.ndarray]:
        count = Counter(c for c, k in zip(cells, keep) if k)
        w = np.array([1 / (count[c] or 1) for c in cells]) / t ** 2
        return fit(f[keep], b[keep], s[keep], t[keep], w[keep], a[keep]), w

    keep = np.ones(len(samples), dtype=bool)
    params, w = weighted_fit(keep)
    for _ in range(3):
        rel = _modelled(params, f, b, s, a) / t - 1
        limit = min(max(OUTLIER_MADS * MAD_SCALE * float(np.median(np.abs(rel[keep]))), OUTLIER_FLOOR),
                    OUTLIER_CEILING)
        if (np.abs(rel) <= limit).tolist() == keep.tolist():
            break
        keep = np.abs(rel) <= limit
        params, w = weighted_fit(keep)
    return params, w, keep


def _modelled(p: RooflineParams, f: np.ndarray, b: np.ndarray, s: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.maximum(f / p.flops_per_s, b / p.bytes_per_s) + p.step_s + p.seq_s * s + p.attention_s_per_flop * a


SHAPE_BATCHES, SHAPE_CHUNKS = (1, 2, 4, 8, 16, 32, 48, 64), (16, 32, 64, 128, 256, 512)


def shapes(samples: list[dict]) -> list[dict]:
    """Measured against modelled, the medians of the plainest steps: decodes alone by batch, one prompt chunk
    alone (from position 0) by length."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for x in samples:
        plan = StepPlan.from_dict(x["plan"])
        if x.get("outlier"):
            continue
        if not plan.prefill and len(plan.decode) in SHAPE_BATCHES:
            groups.setdefault(("decode", len(plan.decode)), []).append(x)
        elif (not plan.decode and len(plan.prefill) == 1 and plan.prefill[0][0] == plan.prefill[0][1]
              and plan.prefill[0][0] in SHAPE_CHUNKS):
            groups.setdefault(("prompt", plan.prefill[0][0]), []).append(x)
    return [dict(kind=kind, size=size, steps=len(g), measured_s=statistics.median(x["seconds"] for x in g),
                 modelled_s=statistics.median(x["modelled_seconds"] for x in g))
            for (kind, size), g in sorted(groups.items())]


def calibrate(model: str, dtype: str, quantization: str, repeats: int = 3, quick: bool = False,
              progress: bool = True, in_situ: bool = True) -> dict:
    """Loads --model, times its steps (in situ: the engine serving insitu.WORKLOAD; else the isolated GRID), fits
    the cost model and returns the calibration (what save() writes and `--cost-model FILE` reads)."""
    started = time.perf_counter()
    runner = ModelRunner(RunnerConfig(model=model, dtype=dtype, quantization=quantization,
                                      kv_cache_memory=None if in_situ else 512 << 20), progress=False)
    weights = QUANT_WEIGHTS.get(quantization, dtype_name(runner.dtype))
    work = Work(runner.model_config, weights, dtype_name(runner.kv_dtype))
    if in_situ:
        workload = insitu.QUICK_WORKLOAD if quick else insitu.WORKLOAD
        samples = in_situ_samples(insitu.run_loop(insitu.collect(runner, workload, progress=progress)), work)
        params, w, keep = fit_in_situ(samples)
    else:
        samples = grid_samples(runner, work, repeats, quick, progress)
        params = fit(*([s[k] for s in samples] for k in ("flops", "bytes", "seqs", "seconds")))
        w, keep = np.ones(len(samples)), np.ones(len(samples), dtype=bool)
    model_cost = RooflineCost(work, params, params.flops_per_s, params.bytes_per_s, "")
    for s, weight, kept in zip(samples, w, keep):
        s["modelled_seconds"] = model_cost.cost(StepPlan.from_dict(s["plan"])).seconds
        if in_situ:
            s["weight"], s["outlier"] = float(weight), not bool(kept)
    errors = np.array([abs(s["modelled_seconds"] / s["seconds"] - 1) for s in samples])[keep]
    kept = [s for s, k in zip(samples, keep) if k]
    intensities = [s["flops"] / s["bytes"] for s in kept]
    ridge = params.flops_per_s / params.bytes_per_s
    cal = dict(kind=CALIBRATION_KIND, method="in-situ" if in_situ else "isolated", host=cpu_model(),
               threads=runner.threads, model=model, dtype=dtype_name(runner.dtype), quantization=quantization,
               created=time.strftime("%Y-%m-%d %H:%M"), params=params.to_dict(),
               max_abs_error=float(errors.max()), mean_abs_error=float(errors.mean()),
               median_abs_error=float(np.median(errors)), p90_abs_error=float(np.quantile(errors, 0.9)),
               # With every step on one side of the ridge the other rate is only a bound, not a measurement.
               bound_sides=sorted({"compute" if i >= ridge else "memory" for i in intensities}),
               wall_s=time.perf_counter() - started, samples=samples)
    if in_situ:
        by_kind = {}
        for kind in ("decode", "prompt", "mixed"):
            e = [abs(s["modelled_seconds"] / s["seconds"] - 1) for s in kept
                 if StepPlan.from_dict(s["plan"]).kind == kind]
            if e:
                by_kind[kind] = dict(steps=len(e), median=float(np.median(e)), p90=float(np.quantile(e, 0.9)))
        timed = [(s["others_cpu"], s["seconds"]) for s in samples if s["others_cpu"] is not None]
        cal.update(workload=[p.name for p in workload],
                   steps=len(samples), outliers=int((~keep).sum()), errors_by_kind=by_kind,
                   # time-weighted over the steps: how much of the calibration other processes shared
                   others_cpu_pct=float(np.average([o for o, _ in timed], weights=[t for _, t in timed]))
                   if timed else None,
                   others_cpu_pct_max=max(o for o, _ in timed) if timed else None,
                   host_seconds_median=float(np.median([s["host_seconds"] for s in samples])),
                   shapes=shapes(samples))
    return cal


def describe_method(cal: dict) -> str:
    """Which calibration it is (a file from before in-situ calibration has no method: it is the grid's)."""
    if cal.get("method") == "in-situ":
        return f"in situ: {len(cal['samples'])} steps of the real engine serving a calibration workload"
    return f"isolated steps: a grid of {len(cal['samples'])} hand-built steps, each timed alone"


def attention_rate(p: dict) -> float:
    """The FLOP rate attention runs at: its FLOPs in the roofline's compute term and the attention term."""
    return 1 / (1 / p["flops_per_s"] + p.get("attention_s_per_flop", 0.0))


def busy_reasons(cal: dict) -> list[str]:
    """Why an in-situ calibration looks disturbed (empty: it does not)."""
    out = []
    if cal["outliers"] > BUSY_STEPS * len(cal["samples"]):
        out.append(f"{cal['outliers'] / len(cal['samples']):.0%} of the steps were disturbed")
    if (cal.get("others_cpu_pct") or 0) > BUSY_CPU_PCT:
        out.append(f"other processes used {cal['others_cpu_pct']:.0f} % of the CPUs")
    if cal["median_abs_error"] > POOR_FIT:
        out.append(f"the fit's median error is {cal['median_abs_error']:.0%}")
    return out


def report(cal: dict) -> str:
    p = cal["params"]
    lines = [f"calibrated {cal['model']} ({cal['dtype']}, quantization {cal['quantization']}) on {cal['host']}, "
             f"{cal['threads']} threads, {describe_method(cal)}:",
             f"  {p['flops_per_s'] / 1e9:,.1f} GFLOP/s, {p['bytes_per_s'] / 1e9:,.1f} GB/s, "
             f"{p['step_s'] * 1e3:.2f} ms per step, {p['seq_s'] * 1e6:.1f} us per sequence"
             + (f", attention at {attention_rate(p) / 1e9:,.1f} GFLOP/s" if p.get("attention_s_per_flop") else "")]
    if cal.get("method") == "in-situ":
        n = len(cal["samples"]) - cal["outliers"]
        lines.append(f"  fit error over {n} steps (relative, each shape weighed alike): median "
                     f"{cal['median_abs_error']:.1%}, 90th percentile {cal['p90_abs_error']:.1%}, mean "
                     f"{cal['mean_abs_error']:.1%}, max {cal['max_abs_error']:.1%}")
        lines.append("  median error by step: " + ", ".join(
            f"{e['median']:.1%} over {e['steps']} {k} steps" for k, e in cal["errors_by_kind"].items()))
        lines.append(f"  {cal['outliers']} of {len(cal['samples'])} steps left out as disturbances (further off "
                     f"than {OUTLIER_MADS:g} scaled median errors and {OUTLIER_FLOOR:.0%}, or {OUTLIER_CEILING:.0%}); "
                     f"the engine's host work "
                     f"after a step: median {cal['host_seconds_median'] * 1e3:.2f} ms (in each step's seconds)")
        for kind, what in (("decode", "decodes alone, by batch"), ("prompt", "a prompt chunk alone, by tokens")):
            lines.append(f"  measured / modelled (medians), {what}: " + ", ".join(
                f"{s['size']}: {s['measured_s'] * 1e3:.0f} / {s['modelled_s'] * 1e3:.0f} ms"
                for s in cal["shapes"] if s["kind"] == kind))
        if cal.get("others_cpu_pct") is not None:
            lines.append(f"  other processes used {cal['others_cpu_pct']:.0f} % of the machine's CPUs meanwhile "
                         f"(at most {cal['others_cpu_pct_max']:.0f} % over a phase)")
        if busy := busy_reasons(cal):
            lines.append(f"  WARNING: {'; '.join(busy)}: the host was busy, and the fit may have whole shapes "
                         "missing or slowed; calibrate again on a quiet machine")
    else:
        lines.append(f"  fit error over {len(cal['samples'])} steps: mean {cal['mean_abs_error']:.1%}, max "
                     f"{cal['max_abs_error']:.1%}")
    if len(cal["bound_sides"]) == 1:
        other = "bandwidth" if cal["bound_sides"] == ["compute"] else "FLOP rate"
        lines.append(f"  every step was {cal['bound_sides'][0]}-bound: the {other} is a bound, not a measurement")
    return "\n".join(lines)


def save(cal: dict, path: str | Path) -> None:
    """JSON, one sample a line (an in-situ calibration holds hundreds, each with its plan)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    head = json.dumps({k: v for k, v in cal.items() if k != "samples"}, indent=2)
    samples = ",\n".join("    " + json.dumps(s) for s in cal["samples"])
    Path(path).write_text(head[:-2] + ',\n  "samples": [\n' + samples + "\n  ]\n}\n")
