"""Memory planner: will this model, at this context and batch, fit on this device? The capacity arithmetic, shown.

    python -m benchmarks.memory_plan --preset story-6b --device-gb 80 --context 2048
    python -m benchmarks.memory_plan --params 6.74B --layers 32 --kv-heads 32 --head-dim 128 --batch 32

A serving device holds the weights (params x bytes each), the KV cache (every running sequence keeps K and V for
each of its tokens in every layer), and an overhead for activations, the CUDA context and kernel workspaces;
a fraction is kept free as headroom. What is left after weights and overhead decides how many tokens of KV fit,
and so the batch: that is why serving at scale is a memory problem before it is a compute one.
GB here is 10^9 bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from model_runner.config import ModelConfig
from model_runner.errors import ModelLoadError

GB = 1e9
FIXED_OVERHEAD_GB = 1.0     # per device: CUDA context, cuBLAS/NCCL workspaces, allocator slack
OVERHEAD_OF_WEIGHTS = 0.10  # activations grow with the model's width, which the weights track
CARD_COUNTS = (1, 2, 4, 8)  # tensor-parallel sizes one node offers
# Bytes per weight of the formats jitney holds (model_runner/quant.py): GGUF blocks of 32 values carry an fp16
# scale (and Q4_1 an fp16 min), so Q8_0 is 34 B per 32 weights and Q4_0 18 B, not 1 and 0.5; int8 has one
# float32 scale per output row (4 B per row of thousands: taken as 1).
WEIGHT_FORMAT_BYTES = {"fp32": 4.0, "bf16": 2.0, "q8_0": 34 / 32, "int8": 1.0, "q4_1": 20 / 32, "q4_0": 18 / 32}
SMALLER_BYTES = (WEIGHT_FORMAT_BYTES["q8_0"], WEIGHT_FORMAT_BYTES["q4_0"])  # weights to try when a plan does not fit
KV_SMALLER_BYTES = (1,)     # fp8/int8 KV (no 4-bit KV cache)


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float   # all parameters, embeddings included
    layers: int
    kv_heads: int   # fewer than the query heads under grouped-query attention (GQA)
    head_dim: int
    source: str = "preset"


@dataclass(frozen=True)
class Settings:
    device_gb: float = 80
    dtype_bytes: float = 2      # per weight
    kv_dtype_bytes: float = 2   # per K or V element
    context: int = 4096         # tokens per sequence (prompt + output)
    batch: int = 64             # sequences resident at once
    overhead_gb: float | None = None  # None -> FIXED_OVERHEAD_GB + OVERHEAD_OF_WEIGHTS x weights
    headroom: float = 0.1       # fraction of the device left unused
    block_size: int = 16        # tokens per KV block (the paged cache allocates whole blocks)
    cards: int = 1              # tensor parallelism: weights and KV heads split evenly over this many devices


PRESETS = {s.name: s for s in (
    ModelShape("story-6b", 6.05e9, 28, 16, 256),        # GPT-J-6B's shape: 16 heads x 256, no GQA
    ModelShape("llama2-7b", 6.74e9, 32, 32, 128),       # 32 heads x 128, no GQA
    ModelShape("llama3-8b", 8.03e9, 32, 8, 128),        # GQA: 32 query heads share 8 KV heads
    ModelShape("llama3-70b", 70.6e9, 80, 8, 128),       # GQA: 64 query heads share 8 KV heads
    ModelShape("smollm2-135m", 134.5e6, 30, 3, 64),     # GQA: 9 query heads share 3 KV heads
)}


# --- model shapes --------------------------------------------------------------------------------------------

def shape_from_config(name: str, mc: ModelConfig) -> ModelShape:
    """A ModelShape from our ModelConfig, its parameters counted from the layer sizes."""
    from .micro import matmul_params  # imported here: it brings torch, which the presets do not need
    # matmul_params counts the lm_head, which is the embedding too when they are tied.
    embedding = 0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size
    norms = (2 * mc.num_hidden_layers + 1) * mc.hidden_size
    biases = mc.num_hidden_layers * mc.head_dim * (mc.num_attention_heads + 2 * mc.num_key_value_heads) \
        if mc.attention_bias else 0
    return ModelShape(name, matmul_params(mc) + embedding + norms + biases, mc.num_hidden_layers,
                      mc.num_key_value_heads, mc.head_dim, source="ModelConfig")


def preset(name: str) -> ModelShape:
    """A preset; the default model's shape is read from its own config when it is installed."""
    from model_runner.loader import DEFAULT_MODEL, resolve_model  # brings torch: only for the default model
    if name != DEFAULT_MODEL:
        return PRESETS[name]
    try:
        return shape_from_config(name, ModelConfig.from_hf_dir(resolve_model(name)))
    except ModelLoadError:
        return PRESETS[name]


def parse_count(text: str) -> float:
    """'6.05B', '134.5M', '7e9' -> a number of parameters."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1].upper())
    return float(text[:-1]) * scale if scale else float(text)


# --- the arithmetic ------------------------------------------------------------------------------------------

def kv_bytes_per_token(m: ModelShape, kv_dtype_bytes: float) -> float:
    """K and V, in every layer, for every KV head: 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * m.layers * m.kv_heads * m.head_dim * kv_dtype_bytes


def kv_bytes_per_seq(m: ModelShape, s: Settings, context: int) -> float:
    """One sequence's KV on one card, in whole blocks: a paged cache wastes at most its last block's tail.

    Tensor parallelism gives each card whole KV heads; with more cards than KV heads, heads are replicated."""
    share = math.ceil(m.kv_heads / s.cards) / m.kv_heads
    return math.ceil(context / s.block_size) * s.block_size * kv_bytes_per_token(m, s.kv_dtype_bytes) * share


def breakdown(m: ModelShape, s: Settings) -> dict[str, float]:
    """Bytes on each card: weights, KV cache, overhead, their total, and the usable memory they must fit in."""
    weights = m.params * s.dtype_bytes / s.cards
    overhead = (s.overhead_gb * GB if s.overhead_gb is not None
                else FIXED_OVERHEAD_GB * GB + OVERHEAD_OF_WEIGHTS * weights)
    kv = s.batch * kv_bytes_per_seq(m, s, s.context)
    return dict(weights=weights, kv_cache=kv, overhead=overhead, total=weights + kv + overhead,
                usable=s.device_gb * GB * (1 - s.headroom))


def kv_room(m: ModelShape, s: Settings) -> float:
    """Bytes per card left for the KV cache once weights and overhead are in (negative: they alone do not fit)."""
    b = breakdown(m, s)
    return b["usable"] - b["weights"] - b["overhead"]


def max_batch(m: ModelShape, s: Settings) -> int:
    return max(0, math.floor(kv_room(m, s) / kv_bytes_per_seq(m, s, s.context)))


def max_context(m: ModelShape, s: Settings) -> int:
    """The longest context (whole blocks) at which the batch fits."""
    per_block = kv_bytes_per_seq(m, s, s.block_size)
    return max(0, math.floor(kv_room(m, s) / (s.batch * per_block))) * s.block_size


def fits(m: ModelShape, s: Settings) -> bool:
    b = breakdown(m, s)
    return b["total"] <= b["usable"]


def cards_needed(m: ModelShape, s: Settings) -> int | None:
    """The fewest cards of one node (tensor parallel) that hold the plan; None if even the largest count fails."""
    return next((n for n in CARD_COUNTS if fits(m, dataclasses.replace(s, cards=n))), None)


# --- report --------------------------------------------------------------------------------------------------

def gb(x: float) -> str:
    return f"{x / GB:,.2f}"


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def dtype_name(nbytes: float) -> str:
    names = {v: k for k, v in WEIGHT_FORMAT_BYTES.items()} | {1.0: "int8/fp8", 0.5: "int4"}
    return names.get(nbytes, f"{nbytes:g} B")


def format_plan(m: ModelShape, s: Settings) -> str:
    b, per_tok = breakdown(m, s), kv_bytes_per_token(m, s.kv_dtype_bytes)
    where = f"one {s.device_gb:g} GB device" if s.cards == 1 else f"each of {s.cards} x {s.device_gb:g} GB devices"
    overhead_how = (f"--overhead-gb {s.overhead_gb:g}" if s.overhead_gb is not None else
                    f"{FIXED_OVERHEAD_GB:g} GB + {OVERHEAD_OF_WEIGHTS:.0%} of weights (a rule of thumb)")
    rows = [("weights", b["weights"], f"{count(m.params)} params x {s.dtype_bytes:g} B"),
            ("KV cache", b["kv_cache"], f"{s.batch} seqs x {s.context:,} tokens x {per_tok:,.0f} B"),
            ("overhead", b["overhead"], overhead_how),
            ("total", b["total"], "weights + KV cache + overhead"),
            ("usable", b["usable"], f"{s.device_gb:g} GB less {s.headroom:.0%} headroom")]
    if s.cards > 1:
        rows[:2] = [(name, x, f"{how}, split over {s.cards} cards") for name, x, how in rows[:2]]
    lines = [f"# memory plan: {m.name} on {where} (GB = 10^9 bytes)",
             f"model: {count(m.params)} params, {m.layers} layers, {m.kv_heads} KV heads x {m.head_dim} "
             f"(shape from {m.source}); weights {dtype_name(s.dtype_bytes)}, KV cache {dtype_name(s.kv_dtype_bytes)}",
             f"KV per token: 2 (K, V) x {m.layers} layers x {m.kv_heads} heads x {m.head_dim} x "
             f"{s.kv_dtype_bytes:g} B = {per_tok:,.0f} B ({per_tok / 1024:,.1f} KiB)",
             f"  per {s.block_size}-token block {per_tok * s.block_size / 2**20:,.2f} MiB, "
             f"per {s.context:,}-token sequence {gb(per_tok * s.context)} GB",
             "", "| item | GB | how |", "|---|---:|---|"]
    lines += [f"| {name} | {gb(x)} | {how} |" for name, x, how in rows]
    lines.append("\noverhead = activations, CUDA context, kernel workspaces, allocator slack: measure it on the "
                 "real server and pass --overhead-gb")
    room = b["usable"] - b["total"]
    lines += ["", f"fits: yes, {gb(room)} GB to spare" if room >= 0 else f"fits: NO, {gb(-room)} GB over"]
    if kv_room(m, s) <= 0:
        lines.append(f"weights + overhead alone ({gb(b['weights'] + b['overhead'])} GB) exceed the usable "
                     f"{gb(b['usable'])} GB: no batch fits at any context")
    else:
        lines.append(f"max batch at context {s.context:,}: {max_batch(m, s):,} sequences")
        lines.append(f"max context at batch {s.batch}: {max_context(m, s):,} tokens")
    if room < 0:
        lines += ["", *format_ways_out(m, s)]
    return "\n".join(lines)


def format_ways_out(m: ModelShape, s: Settings) -> list[str]:
    """What would hold the plan: fewer bytes per weight or KV element, more cards (tensor parallel), or both."""
    weight_bytes = [s.dtype_bytes] + [w for w in SMALLER_BYTES if w < s.dtype_bytes]
    kv_bytes = [s.kv_dtype_bytes] + [kv for kv in KV_SMALLER_BYTES if kv < s.kv_dtype_bytes]
    lines = [f"ways out (batch {s.batch}, context {s.context:,}; one card = {s.device_gb:g} GB):",
             "| weights | KV cache | total GB on one card | max batch on one card | max context on one card "
             "| cards needed (tensor parallel) |", "|---|---|---:|---:|---:|---:|"]
    for w in weight_bytes:
        for kv in kv_bytes:
            one = dataclasses.replace(s, dtype_bytes=w, kv_dtype_bytes=kv, cards=1)
            n = cards_needed(m, one)
            lines.append(f"| {dtype_name(w)} | {dtype_name(kv)} | {gb(breakdown(m, one)['total'])} | "
                         f"{max_batch(m, one):,} | {max_context(m, one):,} | {n or f'> {CARD_COUNTS[-1]}'} |")
    return lines


# --- command line --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> tuple[ModelShape, Settings]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), help="a model shape; the explicit flags below override it")
    p.add_argument("--params", type=parse_count, help="parameter count, e.g. 6.05B or 134.5M")
    p.add_argument("--layers", type=int)
    p.add_argument("--kv-heads", type=int, help="key/value heads (fewer than query heads under GQA)")
    p.add_argument("--head-dim", type=int)
    d = Settings()
    p.add_argument("--dtype-bytes", type=float, default=d.dtype_bytes,
                   help="bytes per weight (2 bf16, 1 int8, 0.5 int4)")
    p.add_argument("--weight-format", choices=list(WEIGHT_FORMAT_BYTES),
                   help="bytes per weight of a format jitney holds, scales included (overrides --dtype-bytes)")
    p.add_argument("--kv-dtype-bytes", type=float, default=d.kv_dtype_bytes, help="bytes per KV element")
    p.add_argument("--context", type=int, default=d.context, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences resident at once")
    p.add_argument("--device-gb", type=float, default=d.device_gb, help="memory of one device, GB")
    p.add_argument("--cards", type=int, default=d.cards, help="devices the model is split over (tensor parallel)")
    p.add_argument("--overhead-gb", type=float, help=f"activations, CUDA context, workspaces per device; default "
                   f"{FIXED_OVERHEAD_GB:g} GB + {OVERHEAD_OF_WEIGHTS:.0%}% of the weights")  # %%: argparse formats help
    p.add_argument("--headroom", type=float, default=d.headroom, help="fraction of the device left unused")
    a = p.parse_args(argv)
    dtype_bytes = WEIGHT_FORMAT_BYTES[a.weight_format] if a.weight_format else a.dtype_bytes
    settings = Settings(device_gb=a.device_gb, dtype_bytes=dtype_bytes, kv_dtype_bytes=a.kv_dtype_bytes,
                        context=a.context, batch=a.batch, overhead_gb=a.overhead_gb, headroom=a.headroom,
                        cards=a.cards)
    given = dict(params=a.params, layers=a.layers, kv_heads=a.kv_heads, head_dim=a.head_dim)
    overrides = {k: v for k, v in given.items() if v is not None}
    if a.preset:
        shape = preset(a.preset)
        return (dataclasses.replace(shape, **overrides, source=f"{shape.source} + flags") if overrides
                else shape), settings
    if len(overrides) < len(given):
        p.error("give --preset, or all of --params --layers --kv-heads --head-dim")
    return ModelShape("custom", **overrides, source="flags"), settings


def main(argv: list[str] | None = None) -> str:
    text = format_plan(*parse_args(argv))
    print(text)
    return text


if __name__ == "__main__":
    main()
