"""Step-cost models: what one engine step costs, from its plan alone.

One interface, StepCostModel.cost(plan) -> StepCost(seconds, flops, bytes), so the simulated runner need not know
where the figures come from. The model here is roofline-shaped:

    seconds = max(flops / flops_per_s, bytes / bytes_per_s) + step_s + seq_s x sequences + all-reduce
              (+ attention_s_per_flop x attention FLOPs, on a host calibrated in situ)

A step does the work of its plan (Work: the FLOPs and bytes the model's shape gives for that mix of prefill
chunks and decodes) at whichever of the two rates binds it, plus a fixed cost per step (the engine's Python, a
launch) and per sequence (building its rows, sampling it). The rates and terms come from a hardware sheet with
stated efficiencies (sim/hardware.py) or from timings on this host fitted by least squares (fit(), used by
sim/calibrate.py). Tensor parallelism over tp devices divides the FLOPs, the weight bytes and the KV heads, and
adds two ring all-reduces of the step's activations per layer (after attention and after the MLP, Megatron's
split), priced from the interconnect.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np

from benchmarks.cost import matmul_params
from model_runner.config import ModelConfig
from model_runner.sequence import Sequence

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per weight as stored, scales included: int8 per-row (one scale per thousands of weights: 1), int4 in
# blocks of 32 with an fp16 scale (GGUF's Q4_0 and GPTQ/AWQ's group-32 layouts: 18 B per 32 weights).
WEIGHT_BYTES = {**DTYPE_BYTES, "int8": 1.0, "int4": 18 / 32}
# KV-cache dtypes: the stored ones, and jitney's int8 cache (--kv-cache-dtype int8), whose rows carry a float32
# scale each: kv_element_bytes.
KV_DTYPES = (*DTYPE_BYTES, "int8")
# Compute dtypes: the stored ones, and tf32 (float32 tensors whose matmuls run on the tensor cores' TF32 path,
# as PyTorch does only when asked: torch.backends.cuda.matmul.allow_tf32). Element size of the activations.
COMPUTE_BYTES = {**DTYPE_BYTES, "tf32": 4}


def kv_element_bytes(kv_dtype: str, head_dim: int) -> float:
    """Bytes per cached K or V element, as the runner's block budget counts them (model_runner/kv_cache.py): the
    dtype's size, or for int8 one byte plus each row's 4-byte scale spread over its head_dim elements."""
    return 1 + 4 / head_dim if kv_dtype == "int8" else DTYPE_BYTES[kv_dtype]


def storage_dtype(dtype: str) -> str:
    """The dtype a compute dtype's tensors are stored in (tf32 computes on float32 tensors)."""
    return "float32" if dtype == "tf32" else dtype


@dataclass(frozen=True)
class StepPlan:
    """What a step's cost depends on: each prompt chunk's (tokens, context after it), each decode's context after
    its token, and how many rows reach the lm_head (sequences whose chunk ends their tokens: they sample)."""
    prefill: tuple[tuple[int, int], ...]
    decode: tuple[int, ...]
    sampled: int

    @classmethod
    def of(cls, scheduled: list[tuple[Sequence, int]]) -> StepPlan:
        """A scheduler's step (sequence, tokens it feeds), as the runner splits it (single tokens are decodes)."""
        prefill, decode, sampled = [], [], 0
        for seq, n in scheduled:
            ctx = seq.num_computed_tokens + n
            (decode.append(ctx) if n == 1 else prefill.append((n, ctx)))
            sampled += ctx == len(seq.token_ids)
        return cls(tuple(prefill), tuple(decode), sampled)

    @property
    def num_tokens(self) -> int:
        return sum(n for n, _ in self.prefill) + len(self.decode)

    @property
    def num_seqs(self) -> int:
        return len(self.prefill) + len(self.decode)

    def to_dict(self) -> dict:
        return dict(prefill=[list(c) for c in self.prefill], decode=list(self.decode), sampled=self.sampled)

    @classmethod
    def from_dict(cls, d: dict) -> StepPlan:
        return cls(tuple((n, c) for n, c in d["prefill"]), tuple(d["decode"]), d["sampled"])

    @property
    def kind(self) -> str:
        """decode (decodes alone), prompt (prompt chunks alone) or mixed."""
        return "mixed" if self.prefill and self.decode else "prompt" if self.prefill else "decode"


@dataclass(frozen=True)
class StepCost:
    seconds: float
    flops: float    # per device
    bytes: float    # per device, memory traffic


class Work:
    """FLOPs and memory bytes of a step on one of tp devices, for a Llama-shaped model.

    FLOPs: 2 per weight per token through the layers' matmuls, 2 per lm_head weight per sampled row, and
    attention's 4 x heads x head_dim per (query, key) pair (q.k and p.v). Bytes: every weight once per step
    (the batch shares the read), each sequence's cached K/V once (a decode reads its context; a prompt chunk reads
    the context before it once, as tiled attention kernels do), and the step's new K/V written once. Activations
    are left out: at serving sizes they are a small fraction of the weight and KV traffic (an approximation the
    validation will bound)."""

    def __init__(self, mc: ModelConfig, weights: str, kv_dtype: str, tp: int = 1, dtype: str | None = None):
        """dtype: the compute dtype, whose element size the activations (the all-reduces' messages) have;
        default: the weights' own float dtype, else the KV cache's (int8 / int4 weights compute in a float)."""
        if weights not in WEIGHT_BYTES:
            raise ValueError(f"unknown weight format {weights!r}: choose one of {', '.join(WEIGHT_BYTES)}")
        dtype = dtype or next(d for d in (weights, kv_dtype, "bfloat16") if d in DTYPE_BYTES)
        if dtype not in COMPUTE_BYTES:
            raise ValueError(f"unknown compute dtype {dtype!r}: choose one of {', '.join(COMPUTE_BYTES)}")
        self.mc, self.tp, self.dtype = mc, tp, dtype
        self.activation_bytes = COMPUTE_BYTES[dtype]
        self.lm_head = mc.vocab_size * mc.hidden_size
        self.layer_params = matmul_params(mc) - self.lm_head
        self.weight_bytes = matmul_params(mc) * WEIGHT_BYTES[weights] / tp
        # Tensor parallelism gives each device whole KV heads; past kv_heads devices, heads are replicated.
        kv_share = math.ceil(mc.num_key_value_heads / tp) / mc.num_key_value_heads
        self.kv_bytes_per_token = mc.kv_bytes_per_token_per_element * kv_element_bytes(kv_dtype, mc.head_dim) * kv_share
        self.attn_flops_per_pair = 4 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim

    def attention_flops(self, plan: StepPlan) -> float:
        """Attention's part of flops(): its (query, key) pairs, a decode's context and a chunk's causal triangle
        (its row i sees ctx - n + i + 1 keys)."""
        pairs = sum(plan.decode) + sum(n * ctx - n * (n - 1) / 2 for n, ctx in plan.prefill)
        return self.attn_flops_per_pair * pairs / self.tp

    def flops(self, plan: StepPlan) -> float:
        return ((2 * self.layer_params * plan.num_tokens + 2 * self.lm_head * plan.sampled) / self.tp
                + self.attention_flops(plan))

    def bytes(self, plan: StepPlan) -> float:
        read = sum(plan.decode) + sum(ctx - n for n, ctx in plan.prefill)
        return self.weight_bytes + self.kv_bytes_per_token * (read + plan.num_tokens)


@dataclass(frozen=True)
class RooflineParams:
    flops_per_s: float      # effective: peak x efficiency, or fitted
    bytes_per_s: float      # effective memory bandwidth
    step_s: float = 0.0     # fixed cost per step
    seq_s: float = 0.0      # cost per sequence in the step
    link_bytes_per_s: float = 0.0   # effective one-way interconnect bandwidth (tensor parallelism)
    allreduce_latency_s: float = 0.0
    # Attention's FLOPs (Work.attention_flops) cost this much each beyond the FLOP rate: fitted in situ, where the
    # attention kernel runs slower than the matmuls (calibrate.py says why); 0 on a sheet device.
    attention_s_per_flop: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class RooflineCost:
    """The roofline-shaped step cost: Work at RooflineParams' rates, on tp devices."""

    def __init__(self, work: Work, params: RooflineParams, peak_flops: float, peak_bytes_per_s: float,
                 description: str):
        self.work, self.params, self.description = work, params, description
        # The peaks utilisation is reported against (a device's published ones; a host's fitted rates).
        self.peak_flops, self.peak_bytes_per_s = peak_flops, peak_bytes_per_s

    def allreduce_s(self, num_tokens: int) -> float:
        tp, p, mc = self.work.tp, self.params, self.work.mc
        if tp == 1:
            return 0.0
        # A ring all-reduce moves 2 (tp - 1) / tp of the message through each link; the message is the step's
        # activations, hidden_size elements per token in the compute dtype (4 bytes in float32, 2 in bfloat16).
        message = num_tokens * mc.hidden_size * self.work.activation_bytes
        one = 2 * (tp - 1) / tp * message / p.link_bytes_per_s + p.allreduce_latency_s
        return 2 * mc.num_hidden_layers * one

    def cost(self, plan: StepPlan) -> StepCost:
        p = self.params
        flops, nbytes = self.work.flops(plan), self.work.bytes(plan)
        seconds = (max(flops / p.flops_per_s, nbytes / p.bytes_per_s) + p.step_s + p.seq_s * plan.num_seqs
                   + p.attention_s_per_flop * self.work.attention_flops(plan) + self.allreduce_s(plan.num_tokens))
        return StepCost(seconds, flops, nbytes)


def spread_cell(plan: StepPlan) -> tuple[str, int, int]:
    """Steps whose times spread alike: the kind, decodes and prompt tokens in powers of 2."""
    return plan.kind, len(plan.decode).bit_length(), sum(n for n, _ in plan.prefill).bit_length()


class SpreadCost:
    """A host's steps as they spread: the base model's time for a step times a ratio drawn (seeded) from the
    calibration's own measured / modelled ratios for steps like it (its spread_cell when that holds MIN_CELL
    measured steps, else its kind's, else any). The roofline gives each step shape one time; the engine's steps
    of one shape do not take one time (the event loop, the allocator, the OS on a shared host), and a latency
    tail is made of the slow ones. Drawing from the measured ratios keeps their spread, and a cell's ratios also
    carry what the fit gets wrong about that shape."""

    MIN_CELL = 5

    def __init__(self, base: RooflineCost, ratios: dict[tuple[str, int, int], list[float]], seed: int | str):
        self.base, self.rng = base, random.Random(seed)
        self.cells = {k: sorted(v) for k, v in ratios.items() if len(v) >= self.MIN_CELL}
        self.kinds: dict[str, list[float]] = {}
        for (kind, _, _), v in sorted(ratios.items()):
            self.kinds.setdefault(kind, []).extend(v)
        self.every = sorted(r for v in ratios.values() for r in v)
        if not self.every:
            raise ValueError("a step-time spread needs measured / modelled ratios")
        self.description = base.description + f"; step times spread as measured ({len(self.every)} steps' ratios)"

    def __getattr__(self, name: str):  # work, params, peaks: the base model's
        return getattr(self.base, name)

    def cost(self, plan: StepPlan) -> StepCost:
        c = self.base.cost(plan)
        pool = self.cells.get(spread_cell(plan)) or self.kinds.get(plan.kind) or self.every
        return StepCost(c.seconds * self.rng.choice(pool), c.flops, c.bytes)


# --- fitting the parameters to timed steps ------------------------------------------------------------------

def _solve(x: np.ndarray, extra: list[np.ndarray], t: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted least squares for t = a x + step + the extra columns' terms (sequences, attention FLOPs), every
    coefficient >= 0 (a term that would come out negative is dropped and the rest refitted: a negative per-step
    cost means the data cannot see it)."""
    cols = np.stack([x, np.ones_like(x), *extra], axis=1)
    sw = np.sqrt(w)
    active = list(range(cols.shape[1]))
    while True:
        coef = np.zeros(cols.shape[1])
        coef[active] = np.linalg.lstsq(cols[:, active] * sw[:, None], t * sw, rcond=None)[0]
        neg = [i for i in active if coef[i] < 0 and i != 0]
        if not neg:
            break
        active.remove(min(neg, key=lambda i: coef[i]))
    resid = cols @ coef - t
    return coef, float(resid * w @ resid)


def fit(flops: list[float], nbytes: list[float], seqs: list[int], seconds: list[float],
        weights: list[float] | None = None, attention_flops: list[float] | None = None) -> RooflineParams:
    """The RooflineParams (no interconnect) whose costs best match the timed steps, by least squares (each
    squared error times its weight, when weights are given: calibrate.py weighs in-situ steps). With
    attention_flops (each step's Work.attention_flops), attention_s_per_flop is fitted too; without, it is 0.

    Given the ridge point r = flops_per_s / bytes_per_s the model is linear: t = max(F, r B) / flops_per_s +
    step_s + seq_s x sequences (+ attention_s_per_flop x attention FLOPs). So r is searched (a log grid over the
    data's intensities, then a golden-section search around the best) and each r solved linearly. When every
    step sits on one side of the ridge the other rate is not identifiable: r lands at the grid's edge and that
    rate is only a bound (calibrate.py reports it)."""
    f, b, s, t = (np.asarray(v, dtype=float) for v in (flops, nbytes, seqs, seconds))
    w = np.ones_like(t) if weights is None else np.asarray(weights, dtype=float)
    extra = [s] if attention_flops is None else [s, np.asarray(attention_flops, dtype=float)]
    intensity = f / b
    lo, hi = math.log(intensity.min() / 4), math.log(intensity.max() * 4)
    def at(log_r: float) -> tuple[float, float, np.ndarray]:
        coef, sse = _solve(np.maximum(f, math.exp(log_r) * b), extra, t, w)
        return (sse if coef[0] > 0 else math.inf), log_r, coef

    best = min((at(x) for x in np.linspace(lo, hi, 121)), key=lambda v: v[0])
    if best[0] == math.inf:
        raise ValueError("the timings do not grow with the work: no roofline fits them")
    # Then a golden-section search in the grid cell either side of the best point, to float precision.
    step = (hi - lo) / 120
    a_, b_ = best[1] - step, best[1] + step
    g = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c_, d_ = b_ - g * (b_ - a_), a_ + g * (b_ - a_)
        if at(c_)[0] <= at(d_)[0]:
            b_ = d_
        else:
            a_ = c_
    best = min(best, at((a_ + b_) / 2), key=lambda v: v[0])
    _, log_r, (a, step_s, seq_s, *attn) = best
    return RooflineParams(flops_per_s=float(1 / a), bytes_per_s=float(1 / (a * math.exp(log_r))), step_s=float(step_s),
                          seq_s=float(seq_s), attention_s_per_flop=float(attn[0]) if attn else 0.0)
