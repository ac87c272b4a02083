"""`jitney simulate --calibrate`: time real engine steps on this host and fit the roofline cost model to them.

A small grid of steps (decodes at several batch sizes and contexts, prompt chunks of several lengths, one mixed
step) runs through the real ModelRunner; each is timed (the median of a few runs after an untimed one that pays
for oneDNN's first sight of a shape). fit() then finds the rates and terms whose modelled costs best match
(least squares), and the result is saved as JSON for `jitney simulate --cost-model FILE`.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from batcher.generate import kv_manager
from benchmarks.machine import cpu_model
from model_runner.config import RunnerConfig
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

from .cost import StepPlan, Work, fit
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


def calibrate(model: str, dtype: str, quantization: str, repeats: int = 3, quick: bool = False,
              progress: bool = True) -> dict:
    runner = ModelRunner(RunnerConfig(model=model, dtype=dtype, quantization=quantization,
                                      kv_cache_memory=512 << 20), progress=False)
    name = lambda d: str(d).removeprefix("torch.")
    weights = QUANT_WEIGHTS.get(quantization, name(runner.dtype))
    work = Work(runner.model_config, weights, name(runner.kv_dtype))
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
        samples.append(dict(prefill=list(prefills), decode_batch=batch, decode_context=context,
                            flops=work.flops(plan), bytes=work.bytes(plan), seqs=plan.num_seqs,
                            seconds=statistics.median(times)))
        if progress:
            print(f"  step: prompt chunks {list(prefills) or '-'}, {batch} decodes at context {context}: "
                  f"{samples[-1]['seconds'] * 1e3:.1f} ms", flush=True)
    params = fit(*([s[k] for s in samples] for k in ("flops", "bytes", "seqs", "seconds")))
    from .cost import RooflineCost
    model_cost = RooflineCost(work, params, params.flops_per_s, params.bytes_per_s, "")
    for s in samples:
        plan = StepPlan(tuple((n, n) for n in s["prefill"]), (s["decode_context"],) * s["decode_batch"],
                        len(s["prefill"]) + s["decode_batch"])
        s["modelled_seconds"] = model_cost.cost(plan).seconds
    errors = [abs(s["modelled_seconds"] / s["seconds"] - 1) for s in samples]
    intensities = [s["flops"] / s["bytes"] for s in samples]
    ridge = params.flops_per_s / params.bytes_per_s
    return dict(kind=CALIBRATION_KIND, host=cpu_model(), threads=runner.threads, model=model, dtype=name(runner.dtype),
                quantization=quantization, created=time.strftime("%Y-%m-%d %H:%M"), params=params.to_dict(),
                max_abs_error=max(errors), mean_abs_error=sum(errors) / len(errors),
                # With every step on one side of the ridge the other rate is only a bound, not a measurement.
                bound_sides=sorted({"compute" if i >= ridge else "memory" for i in intensities}),
                samples=samples)


def report(cal: dict) -> str:
    p = cal["params"]
    lines = [f"calibrated {cal['model']} ({cal['dtype']}, quantization {cal['quantization']}) on {cal['host']}, "
             f"{cal['threads']} threads:",
             f"  {p['flops_per_s'] / 1e9:,.1f} GFLOP/s, {p['bytes_per_s'] / 1e9:,.1f} GB/s, "
             f"{p['step_s'] * 1e3:.2f} ms per step, {p['seq_s'] * 1e6:.1f} us per sequence",
             f"  fit error over {len(cal['samples'])} steps: mean {cal['mean_abs_error']:.1%}, max "
             f"{cal['max_abs_error']:.1%}"]
    if len(cal["bound_sides"]) == 1:
        other = "bandwidth" if cal["bound_sides"] == ["compute"] else "FLOP rate"
        lines.append(f"  every step was {cal['bound_sides'][0]}-bound: the {other} is a bound, not a measurement")
    return "\n".join(lines)


def save(cal: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(cal, indent=2) + "\n")
