"""What a lent CUDA GPU checks: jitney's model on CUDA against transformers, greedy batch invariance and KV blocks
on CUDA, and the simulator's hardware sheet (`jitney simulate --device`) against real runs of the same traces.

    python -m benchmarks.cuda_check --out DIR --tokenizer DIR [--shapes smollm2,llama-1b,story-6b] [--device cuda]

On a lent machine through the device tool: `bash benchmarks/scripts/cuda_carry.sh` here, then
`bash benchmarks/scripts/cuda_check.sh` there with `.cudacheck` carried (docs/simulation.md, On a real GPU).

No weights travel to the GPU machine (the default model's GGUF is over what a lent machine takes): each shape is a
seeded random-init Llama made where it runs, with SmolLM2's tokenizer. A step's time does not depend on what the
weights hold, and the reference checks compare two implementations on the very same weights. `--device cpu` runs
the same checks here (the correctness part is the baseline the CUDA figures are read against).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
import traceback
from pathlib import Path

import torch

from model_runner.tiny import llama_weights

# Shapes beside the default model's: a 1B Llama (Llama 3.2 1B's layers over SmolLM2's vocabulary) and the story's
# ~6B (sim.models.STORY_6B; its vocabulary cut to the tokenizer's, so every sampled id detokenizes).
SHAPES = {
    "smollm2": {},
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),  # the checks' own test (tests/test_cuda_check.py)
    "story-6b": dict(hidden_size=4096, intermediate_size=10944, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=256, rope_theta=10000.0, max_position_embeddings=2048,
                     tie_word_embeddings=False),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
           "1, 2, 3, 4, 5,", "Photosynthesis is the process by which", "<html><body><h1>",
           "Q: What is the boiling point of water?\nA:", "Les feuilles mortes se ramassent à la pelle,"]
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template")  # what random_model takes from --tokenizer
# The #20 burst: 128 at once, prompts 32..512 tokens, 16..256 forced output tokens.
BURST = ["--workload", "burst", "--num-requests", "128", "--prompt-len", "32,512", "--output-len", "16,256"]


def random_model(root: Path, tokenizer: Path, shape: str, dtype: torch.dtype, device: str) -> Path:
    """A seeded random-init Llama of this shape (weights std 0.02, norms 1, as at initialisation) in `dtype`."""
    from safetensors.torch import save_file
    path = root / f"{shape}-{str(dtype).split('.')[-1]}"
    if (path / "config.json").is_file():
        return path
    config = json.loads((tokenizer / "config.json").read_text()) | SHAPES[shape]
    config["torch_dtype"] = str(dtype).split(".")[-1]
    g = torch.Generator(device=device).manual_seed(0)
    w = llama_weights(config, lambda *s: (torch.randn(*s, generator=g, device=device) * 0.02).to(dtype).cpu(),
                      lambda d: torch.ones(d, dtype=dtype))
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(w, str(tmp / "model.safetensors"))
    for f in tokenizer.iterdir():
        if f.name.startswith(TOKENIZER_FILES):
            shutil.copy(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, path)
    return path


def correctness(model: Path, device: str) -> dict:
    """In float32 and in bfloat16: our logits against transformers' float64 ones on the same device (relative to
    the largest), each prompt's greedy text alone against all of them batched together, and every KV block back
    at the end."""
    from transformers import AutoModelForCausalLM

    from batcher.generate import generate, kv_manager, score
    from model_runner.config import RunnerConfig
    from model_runner.runner import ModelRunner
    from model_runner.sampling_params import SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).to(device).eval()
    out = {}
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner(RunnerConfig(model=str(model), dtype=dtype, device=device, kv_cache_memory=1 << 30),
                             progress=False)
        kv = kv_manager(runner)
        ids = [runner.tokenizer(p)["input_ids"] for p in PROMPTS]
        err = 0.0
        for x in ids:
            with torch.inference_mode():
                ref = hf(torch.tensor([x], device=device)).logits[0].float()
            ours = score(runner, x, kv).to(device)
            err = max(err, ((ours - ref).abs().max() / ref.abs().max()).item())
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        alone = [generate(runner, [x], params, kv=kv)[0].output_token_ids for x in ids]
        together = [s.output_token_ids for s in generate(runner, ids, params, kv=kv)]
        out[dtype] = dict(logits_rel_err_vs_float64=err, greedy_same_alone_and_batched=sum(
            a == b for a, b in zip(alone, together)), prompts=len(ids),
            first_divergence=[next((j for j, (p, q) in enumerate(zip(a, b)) if p != q), None)
                              for a, b in zip(alone, together)],
            kv_blocks_free_after=kv.num_free, kv_blocks=runner.num_blocks, describe=runner.describe())
        print(f"  {dtype}: {json.dumps(out[dtype])}", flush=True)
        del runner
    return out


def step_medians(results: Path) -> dict[str, dict]:
    """Per policy, from a bench's results.json: the median step while requests still wait (under continuous
    batching, prompt chunks beside decodes) and the median step once none waits, by batch size (buckets of 16),
    in ms, with how many steps each."""
    out = {}
    for run in json.loads(results.read_text())["runs"]:
        t, n, w = (run["timeline"][k] for k in ("t", "running", "waiting"))
        d = [(n[i], w[i] > 0, w[i - 1] > 0, t[i] - t[i - 1]) for i in range(1, len(t))]
        row = {"steps while requests wait": [x for _, wait, _, x in d if wait]}
        for b, wait, before, x in d:
            if not wait and not before:
                row.setdefault(f"decode b{b // 16 * 16}-{b // 16 * 16 + 15}", []).append(x)
        out[run["policy"]] = {k: (round(1e3 * statistics.median(v), 1), len(v)) for k, v in row.items() if v}
    return out


def sim_vs_real(model: Path, out: Path, device: str, sheet: str, policies: str) -> dict:
    """The burst for real on this device, then the same trace through `jitney simulate --device SHEET`."""
    from .sim_validate import compare, jitney, summaries, table
    real, sim, trace = out / f"real-{model.name}", out / f"sim-{model.name}", out / f"trace-{model.name}.jsonl"
    with open(out / f"log-{model.name}.txt", "w") as log:
        for args in (["bench", "--in-process", "--device", device, "--model", str(model), "--dtype", "bfloat16",
                      *BURST, "--policies", policies, "--save-trace", str(trace), "--out", str(real)],
                     ["simulate", "--device", sheet, "--model", str(model), "--dtype", "bfloat16", "--trace",
                      str(trace), "--policies", policies, "--out", str(sim)]):
            t = time.perf_counter()
            jitney(*args, log=log, timeout=400)
            print(f"  jitney {args[0]}: {time.perf_counter() - t:.0f} s", flush=True)
    rows = compare(summaries(real), summaries(sim))
    print(table(f"{model.name}: real / {sheet} sheet", rows), flush=True)
    steps = step_medians(real / "results.json")
    print(f"  real step medians, ms (steps): {json.dumps(steps)}", flush=True)
    return {"figures": rows, "step_medians": steps}


def step_plans(seed: int = 0) -> list[tuple[str, list[int], list[int]]]:
    """profile_step's steps as (name, contexts, chunks), and a mixed step as continuous batching makes them
    while prompts wait: 100 decodes beside a prompt's second chunk and a fresh prompt (512 tokens in all)."""
    from .profile_step import STEPS
    rng = random.Random(seed)
    plans = [(name, [rng.randint(lo, hi) for _ in range(b)], [chunk] * b) for name, b, lo, hi, chunk in STEPS]
    decodes = [rng.randint(100, 600) for _ in range(100)]
    return plans + [("mixed, 100 decodes + chunks of 200 and 312", decodes + [400, 312], [1] * 100 + [200, 312])]


def step_times(model: Path, device: str, steps: int = 10) -> list[dict]:
    """Each step of step_plans on this device: its wall time (synchronized), how many operators it dispatches
    (top-level aten calls: each costs the host some microseconds, and on a GPU each that computes is a kernel
    launch), and on a GPU its kernels and the time they kept the GPU busy (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from model_runner import threads
    from model_runner.config import RunnerConfig
    from model_runner.runner import ModelRunner

    from .steps import held
    runner = ModelRunner(RunnerConfig(model=str(model), dtype="bfloat16", device=device, kv_cache_memory=8 << 30),
                         progress=False)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def profiled(plan):  # on the runner's own thread, where its operators run
        with profile(activities=activities) as prof:
            runner.execute(plan)
            sync()
        return prof.events()

    rows = []
    for name, contexts, chunks in step_plans():
        with held(runner, contexts, chunks) as plan:
            for _ in range(3):
                runner.execute(plan)
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                runner.execute(plan)
            sync()
            wall = (time.perf_counter() - t) / steps
            events = threads.torch_thread().run(profiled, plan)
        ops = [e for e in events if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU
               and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3  # a kernel event spans its run on the GPU
        rows.append(dict(step=name, wall_ms=1e3 * wall, ops=len(ops), kernels=len(kernels), gpu_busy_ms=busy))
        print(f"  {name:45s} wall {1e3 * wall:7.2f} ms, {len(ops)} operators"
              + (f", {len(kernels)} kernels, GPU busy {busy:.2f} ms" if cuda else ""), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the figures (check.json) and every run's files")
    p.add_argument("--tokenizer", help="a model folder with SmolLM2's config.json and tokenizer files (its weights "
                                       "are not read)")
    p.add_argument("--models", default="/tmp/cuda-check-models", help="where the random models are made")
    p.add_argument("--device", default="cuda", help="where the checks run (default: cuda; cpu gives the baseline)")
    p.add_argument("--sheet", default="h100-sxm", help="the simulator's hardware sheet for this device")
    p.add_argument("--shapes", default="smollm2,llama-1b,story-6b", help=f"from {', '.join(SHAPES)}")
    p.add_argument("--policies", default="continuous,dynamic", help="the real and simulated runs' policies")
    p.add_argument("--steps-of", metavar="RESULTS_JSON", help="only print step_medians of this bench results.json")
    p.add_argument("--skip-correctness", action="store_true", help="leave out the reference and batching checks")
    p.add_argument("--skip-sim", action="store_true", help="leave out the real-against-simulated runs")
    p.add_argument("--step-shapes", default="", help="also time single steps of these shapes (wall time, operators "
                                                     "dispatched and, on a GPU, kernels and busy time)")
    a = p.parse_args(argv)
    if a.steps_of:
        return print(json.dumps(step_medians(Path(a.steps_of)), indent=1))
    if not (a.out and a.tokenizer):
        p.error("--out and --tokenizer are needed (unless --steps-of)")
    out, root, tok = Path(a.out), Path(a.models), Path(a.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"torch": torch.__version__}
    if a.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result), flush=True)

    def model(shape: str, dtype: torch.dtype = torch.bfloat16) -> Path:
        return random_model(root, tok, shape, dtype, a.device)

    parts = [] if a.skip_correctness else [("correctness", lambda: correctness(model("smollm2", torch.float32),
                                                                              a.device))]
    parts += [(f"steps-{s}", lambda s=s: step_times(model(s), a.device))
              for s in filter(None, a.step_shapes.split(","))]
    parts += [] if a.skip_sim else [(f"sim-{s}", lambda s=s: sim_vs_real(model(s), out, a.device, a.sheet, a.policies))
                                    for s in a.shapes.split(",")]
    for name, fn in parts:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result[name] = fn()
        except Exception as e:  # one failing part must not hide the others' figures
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
        (out / "check.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
