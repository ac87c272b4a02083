"""Quantized weights against float, on one machine: quality, kernel candidates, and decode speed per batch.

    python -m benchmarks.quantization [--model M] [--modes none,int8,q4] [--batch-sizes 1,8,64,128]
                                      [--precisions float32:float32,float32:bfloat16,bfloat16:bfloat16]
                                      [--llama-bench PATH] [--quick] [--json out.json] [--plot out.png]

Every part runs each --modes x --precisions combination (compute:KV-cache dtype, the pairs the CPU accepts;
bfloat16 compute is what --dtype auto picks on an AVX512-BF16 CPU, float32 elsewhere).
Quality: perplexity on a fixed text shipped in the repo (benchmarks/data/gpl-3.0.txt, first --ppl-tokens tokens,
in windows of 512) and greedy agreement on 32 prompts: tokens generated before the first one that differs from
the first combination's (none, float32), out of --agree-tokens; and, for a KV-cache dtype such as int8, the same
agreement with each run of the same mode and compute dtype over another KV-cache dtype (`vs_KV` columns:
`--modes none --precisions bfloat16:bfloat16,bfloat16:int8` gives int8 KV against bfloat16 KV).
Kernels: one matmul of the model's shapes per candidate (float packed for oneDNN, the native quantized kernel's
two paths: the integer loop and the dense path of dequantized slices through oneDNN, torch's _weight_int8pack_mm
and _weight_int4pack_mm_for_cpu), per batch and compute dtype; q4_path names the path jitney takes there.
Speed: decode step (mean and fastest of --gen-len steps) and static-batch generate tok/s per combination and batch
(path: the quantized matmuls' path for the decode step's rows; a generate's prompt steps have more rows), and
batch 1's weight-read floor (weight bytes / measured copy bandwidth) beside the step it is part of.
--llama-bench runs llama.cpp's `llama-bench -p 0 -n 128` on the same GGUF (benchmarks/peers/llama_bench.sh
builds it).
"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import textwrap
import time
from pathlib import Path

import torch

from api import flags
from model_runner import qmatmul, quant
from model_runner.config import RunnerConfig
from batcher.generate import generate, kv_manager, score
from model_runner.linear import Linear
from model_runner.loader import DEFAULT_MODEL, gguf_source
from model_runner.precision import cpu_kind, dtype_name
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams

from .machine import best_seconds, copy_gbps, cpu_model
from .micro import make_prompts, time_generate
from .steps import decode_step_times
from .report import finish

TEXT = Path(__file__).parent / "data" / "gpl-3.0.txt"
WINDOW = 512  # perplexity window (tokens): each scored on its own, from an empty context
TOPICS = ["the moon", "bread", "rivers", "prime numbers", "the violin", "volcanoes", "owls", "chess", "glass",
          "the Roman empire", "tea", "magnets", "coral reefs", "compilers", "autumn", "bicycles", "whales",
          "paper", "clocks", "deserts", "bees", "lighthouses", "maps", "salt", "thunder", "bridges", "cheese",
          "comets", "knots", "rain", "trains", "ink"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantization", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--modes", default="none,int8,q4")
    p.add_argument("--precisions", default="float32:float32,float32:bfloat16,bfloat16:bfloat16",
                   help="compute:KV-cache dtype pairs, comma-separated (auto:auto is --dtype auto's)")
    p.add_argument("--batch-sizes", default="1,8,64,128")
    p.add_argument("--gen-len", type=int, default=32, help="decode steps timed per batch")
    p.add_argument("--repeats", type=int, default=1,
                   help="time the decode steps and the generate this many times, keep the fastest (a shared machine)")
    p.add_argument("--quant-dense-rows", default="auto", metavar="off|auto|N", type=flags.dense_rows,
                   help="as for jitney serve; the speed table's runners and the kernel table's q4_path (default: auto, "
                        "this CPU's crossover; jitney serve's default is off)")
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--agree-tokens", type=int, default=64)
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: quality,kernels,speed")
    p.add_argument("--llama-bench", help="path to llama.cpp's llama-bench, run on the same GGUF")
    p.add_argument("--quick", action="store_true", help="a smoke run: batch 1,8, short texts")
    p.add_argument("--json")
    p.add_argument("--plot", help="write tok/s against batch per mode to this PNG")
    a = p.parse_args(argv)
    if a.quick:
        a.batch_sizes, a.gen_len, a.ppl_tokens, a.agree_tokens = "1,8", 8, 512, 16
    a.modes, a.skip = a.modes.split(","), set(filter(None, a.skip.split(",")))
    a.precisions = [tuple(p.split(":")) for p in a.precisions.split(",")]
    if any(len(p) != 2 for p in a.precisions):
        p.error("--precisions: compute:kv pairs such as float32:bfloat16")
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    return a


def runner_for(model: str, mode: str, precision: tuple[str, str], kv_bytes: int,
               dense: str = "off") -> ModelRunner:
    return ModelRunner(RunnerConfig(model=model, dtype=precision[0], kv_cache_dtype=precision[1], quantization=mode,
                                    kv_cache_memory=kv_bytes, quant_dense_rows=dense), progress=False)


def combos(a: argparse.Namespace) -> list[tuple[str, tuple[str, str]]]:
    return [(mode, prec) for prec in a.precisions for mode in a.modes]


# --- quality -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def perplexity(runner: ModelRunner, ids: list[int]) -> float:
    nll, count, kv = 0.0, 0, kv_manager(runner)
    for start in range(0, len(ids) - 1, WINDOW):
        window = ids[start: start + WINDOW + 1]
        logp = score(runner, window[:-1], kv).log_softmax(-1)
        nll -= logp.gather(1, torch.tensor(window[1:])[:, None]).sum().item()
        count += len(window) - 1
    return math.exp(nll / count)


def greedy_tokens(runner: ModelRunner, prompts: list[list[int]], n: int) -> list[list[int]]:
    seqs = generate(runner, prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [s.output_token_ids for s in seqs]


def agreement(ref: list[list[int]], out: list[list[int]]) -> tuple[float, int]:
    """Mean tokens before the first difference, and how many outputs are identical throughout."""
    firsts = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r)) for r, o in zip(ref, out)]
    return sum(firsts) / len(firsts), sum(f == len(r) for f, r in zip(firsts, ref))


def quality(a: argparse.Namespace) -> list[dict]:
    rows, ref, outs = [], None, {}
    for mode, prec in combos(a):
        runner = runner_for(a.model, mode, prec, 256 << 20)  # 32 prompts x ~80 tokens in float32
        tok = runner.tokenizer
        ids = tok(TEXT.read_text())["input_ids"][: a.ppl_tokens + 1]
        prompts = [tok(f"Write a short paragraph about {t}.")["input_ids"] for t in TOPICS]
        out = greedy_tokens(runner, prompts, a.agree_tokens)
        ref = ref or out
        outs[(mode, *prec)] = out
        mean_first, identical = agreement(ref, out)
        rows.append(dict(mode=mode, compute=prec[0], kv=prec[1], weights=quant.describe_bytes(runner.weight_bytes),
                         ppl_tokens=len(ids) - 1, perplexity=perplexity(runner, ids), agree_mean=mean_first,
                         identical=identical))
        print(f"  quality {mode} {prec[0]}:{prec[1]}: perplexity {rows[-1]['perplexity']:.3f}, agreement {mean_first:.1f}/"
              f"{a.agree_tokens}, {identical}/{len(prompts)} identical", flush=True)
    kvs = list(dict.fromkeys(kv for _, kv in a.precisions))
    for r in rows:  # agreement with the same mode and compute over each other KV-cache dtype run
        for kv in kvs:
            other = outs.get((r["mode"], r["compute"], kv))
            mean, same = agreement(other, outs[(r["mode"], r["compute"], r["kv"])]) if other else (None, None)
            r[f"vs_{kv}_kv"] = "-" if other is None or kv == r["kv"] else f"{mean:.1f} ({same}/{len(other)})"
    return rows


# --- kernel candidates ---------------------------------------------------------------------------------------

def torch_int4(w: torch.Tensor):
    """torch's int4 weight-only matmul (groups of 32, asymmetric: scale and zero point in bf16)."""
    n, k = w.shape
    g = w.float().view(n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # torch's zero point is the value of q = 8: w = (q - 8) scale + zero.
    sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz)


def torch_int8(w: torch.Tensor):
    scale = w.abs().amax(1) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale.bfloat16())


def kernels(a: argparse.Namespace, runner: ModelRunner) -> list[dict]:
    """(at the runner's compute dtype)"""
    """One matmul per candidate at the model's shapes, best of 10 (ms)."""
    mc, rows = runner.model_config, []
    shapes = {"gate_up": (2 * mc.intermediate_size, mc.hidden_size), "down": (mc.hidden_size, mc.intermediate_size),
              "head": (mc.vocab_size, mc.hidden_size)}
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=gen) * 0.05
        q4 = quant.QuantWeight.from_gguf("q4_1", quant_q4_1(w), k)
        i8 = quant.QuantWeight.int8(w)
        cands = {"float (oneDNN)": Linear(w.to(runner.dtype)),
                 f"native q4_1 ({quant.isa()})": lambda x: qmatmul.matmul([q4], x, path="integer"),
                 "q4_1 dense (dequantized slices, oneDNN)": lambda x: qmatmul.matmul([q4], x, path="dense"),
                 f"native int8 ({quant.isa()})": lambda x: qmatmul.matmul([i8], x, path="integer"),
                 "int8 dense": lambda x: qmatmul.matmul([i8], x, path="dense"),
                 "torch _weight_int8pack_mm (bf16 x)": torch_int8(w),
                 "torch _weight_int4pack_mm_for_cpu (bf16 x)": torch_int4(w)}
        for m in a.batch_sizes:
            x = torch.randn(m, k, generator=gen).to(runner.dtype)
            row = dict(shape=f"{name} {n}x{k}", dtype=dtype_name(runner.dtype), batch=m,
                       q4_path=qmatmul.choose_path(m, qmatmul.dense_min_rows(runner.dtype, a.quant_dense_rows)))
            for cname, f in cands.items():
                row[cname] = 1e3 * best_seconds(lambda: f(x), 10)
            rows.append(row)
            print("  kernels " + ", ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                                           for k, v in row.items()), flush=True)
    return rows


def quant_q4_1(w: torch.Tensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    return torch.from_numpy(quantize(w.numpy(), GGMLQuantizationType.Q4_1))


# --- speed ---------------------------------------------------------------------------------------------------

def speed(a: argparse.Namespace, gbps: float) -> list[dict]:
    rows = []
    longest = 40 + a.gen_len + 8
    kernel_dtypes = set()
    for mode, prec in combos(a):
        probe = runner_for(a.model, mode, prec, 8 << 20)
        per_token = probe.kv_cache_bytes / (probe.num_blocks * probe.block_size)
        runner = runner_for(a.model, mode, prec, int(per_token * (longest + 32) * max(a.batch_sizes) * 1.2),
                            a.quant_dense_rows)
        del probe
        weight_bytes = sum(runner.weight_bytes.values())
        for b in a.batch_sizes:
            prompts = make_prompts(runner.tokenizer, b, 32)
            runs = [decode_step_times(runner, prompts, a.gen_len) for _ in range(a.repeats)]
            step_s = min(sum(r) / len(r) for r in runs)
            fastest_s = min(min(r) for r in runs)
            gen_s = min(time_generate(runner, prompts, a.gen_len) for _ in range(a.repeats))
            rows.append(dict(mode=mode, dtype=dtype_name(runner.dtype),
                             kv=dtype_name(runner.kv_dtype), batch=b,
                             path="-" if mode == "none" else qmatmul.choose_path(b, runner.quant_dense_rows),
                             step_ms=1e3 * step_s, fastest_step_ms=1e3 * fastest_s, decode_tok_s=b / step_s,
                             generate_tok_s=b * a.gen_len / gen_s,
                             weight_mib=weight_bytes / 2**20, weight_read_ms=1e3 * weight_bytes / (gbps * 1e9)))
            r = rows[-1]
            print(f"  speed {mode} {r['dtype']}:{r['kv']} batch {b}: step {r['step_ms']:.1f} ms (fastest "
                  f"{r['fastest_step_ms']:.1f}; {r['decode_tok_s']:.1f} tok/s), generate "
                  f"{r['generate_tok_s']:.1f} tok/s; weights {r['weight_mib']:.0f} MiB = {r['weight_read_ms']:.1f} "
                  f"ms to read", flush=True)
        if "kernels" not in a.skip and runner.dtype not in kernel_dtypes:
            kernel_dtypes.add(runner.dtype)
            a.kernel_rows += kernels(a, runner)
        del runner
    return rows


def llama_bench(binary: str, model: str) -> dict:
    gguf = gguf_source(model)
    cmd = [binary, "-m", str(gguf), "-p", "0", "-n", "128", "-t", str(torch.get_num_threads()), "-o", "md"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    rate = re.search(r"tg128\s*\|\s*([\d.]+)", out)
    return dict(command=" ".join(cmd), table=out.strip(), tg128_tok_s=float(rate.group(1)) if rate else None)


# --- report --------------------------------------------------------------------------------------------------

def table(rows: list[dict], cols: list[str], fmt: str = "{:.3f}") -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    body = ["| " + " | ".join(fmt.format(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
            for r in rows]
    return "\n".join([head, *body])


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for combo in dict.fromkeys((r["mode"], r["dtype"], r["kv"]) for r in rows):
        mine = [r for r in rows if (r["mode"], r["dtype"], r["kv"]) == combo]
        ax.plot([r["batch"] for r in mine], [r["decode_tok_s"] for r in mine], marker="o",
                label=f"{combo[0]}, {combo[1]} (KV {combo[2]})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences decoding together)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.legend(title="--quantization, compute", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    a = parse_args(argv)
    a.kernel_rows = []
    cpu = f"{cpu_model()}, {cpu_kind()}, {torch.get_num_threads()} threads"
    print(f"# quantization: {a.model} on {cpu}; quantized matmul loop: {quant.isa()}", flush=True)
    report: dict = dict(cpu=cpu, kernel_loop=quant.isa(), model=a.model)
    if "quality" not in a.skip:
        report["quality"] = quality(a)
        print("\n## quality (perplexity on benchmarks/data/gpl-3.0.txt; agreement with the first row)\n")
        kv_cols = [f"vs_{kv}_kv" for kv in dict.fromkeys(kv for _, kv in a.precisions)]
        print(table(report["quality"], ["mode", "compute", "kv", "weights", "ppl_tokens", "perplexity", "agree_mean",
                                        "identical", *(kv_cols if len(kv_cols) > 1 else [])]))
    if "speed" not in a.skip:
        gbps = copy_gbps(2**28)
        report["copy_gbps"] = gbps
        report["speed"] = speed(a, gbps)
        print(f"\n## speed (memory copy {gbps:.1f} GB/s)\n")
        print(table(report["speed"], ["mode", "dtype", "kv", "batch", "path", "step_ms", "fastest_step_ms",
                                      "decode_tok_s", "generate_tok_s", "weight_mib", "weight_read_ms"], "{:.1f}"))
        if a.plot:
            plot(report["speed"], a.plot, f"{a.model}: {cpu}")
    if a.kernel_rows:
        report["kernels"] = a.kernel_rows
        print("\n## kernel candidates (ms per matmul, best of 10)\n")
        print(table(a.kernel_rows, list(a.kernel_rows[0])))
    if a.llama_bench:
        report["llama_bench"] = llama_bench(a.llama_bench, a.model)
        print(f"\n## llama.cpp: {report['llama_bench']['command']}\n\n{report['llama_bench']['table']}")
    return finish(report, a.json, started)


if __name__ == "__main__":
    from model_runner.threads import torch_thread
    torch_thread().run(main)  # all timed work on the thread that loads the model: one OpenMP pool
