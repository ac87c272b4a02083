"""What the tiled prompt kernel's bfloat16 weights cost the model: SmolLM2's perplexity over two 1,024-token
windows of this repository's README text, scored as prompts (so every row goes through the prompt path), in
float32, in bfloat16 with prompts tiled, and in bfloat16 with every row on the row kernel; and how often each
position's argmax agrees with float32's.

    python -m benchmarks.prefill_quality      (about a minute; needs the tiled kernel: AVX512-BF16)
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from batcher.generate import kv_manager
from model_runner.config import RunnerConfig
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

ROOT = Path(__file__).resolve().parent.parent
WINDOW, STARTS = 1024, (0, 5000)


def logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    kv = kv_manager(runner)
    seq = Sequence(ids, SamplingParams(max_tokens=1))
    kv.allocate_slots(seq, len(ids))
    try:
        return runner.score(seq).float()
    finally:
        kv.free(seq)


def mean_nll(lg: torch.Tensor, ids: list[int]) -> float:
    return -torch.log_softmax(lg[:-1], -1).gather(1, torch.tensor(ids[1:]).view(-1, 1)).mean().item()


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m benchmarks.prefill_quality", description=__doc__.split("\n\n")[0]
                            ).parse_args(argv)
    f32 = ModelRunner(RunnerConfig(dtype="float32", kv_cache_memory=256 << 20), progress=False)
    bf16 = ModelRunner(RunnerConfig(dtype="bfloat16", kv_cache_memory=256 << 20), progress=False)
    if not bf16.tiled_prefill:
        print("the tiled prompt kernel does not run here (it needs AVX512-BF16): nothing to compare")
        return
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "README.md").read_text()
    ids = f32.tokenizer(text)["input_ids"]
    windows = [ids[s:s + WINDOW] for s in STARTS]
    out = {}
    for name, runner, tiled in (("float32", f32, False), ("bfloat16, prompts tiled", bf16, True),
                                ("bfloat16, row kernel", bf16, False)):
        runner.tiled_prefill = tiled
        out[name] = [logits(runner, w) for w in windows]
        ppl = math.exp(sum(mean_nll(lg, w) for lg, w in zip(out[name], windows)) / len(windows))
        agree = sum((lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
                    for lg, ref in zip(out[name], out["float32"])) / len(windows)
        print(f"{name}: perplexity {ppl:.3f}, argmax agrees with float32's at {100 * agree:.1f} % of positions")
    bf16.tiled_prefill = True
    diff = max((a - b).abs().max().item() for a, b in zip(out["bfloat16, prompts tiled"], out["bfloat16, row kernel"]))
    print(f"largest logit difference, tiled against the row kernel: {diff:.3f}")


if __name__ == "__main__":
    main()
