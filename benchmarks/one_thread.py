"""Why all model work runs on one thread (model_runner/threads.py): a batch-1 decode, timed with the model's work on
the torch thread alone, then again after the main thread has run one parallel op of its own (as it did when the
main thread loaded the model and the engine stepped on another): libgomp then holds two pools, more OpenMP threads
than CPUs, and throttles their spinning.

    .venv/bin/python -m benchmarks.one_thread [--model smollm2-135m] [--tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from batcher.generate import generate
from model_runner.config import RunnerConfig
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams

from .machine import cpu_model


def per_token_ms(runner: ModelRunner, tokens: int) -> float:
    t0 = time.perf_counter()
    generate(runner, [list(range(100, 160))], SamplingParams(max_tokens=tokens, ignore_eos=True))
    return (time.perf_counter() - t0) / tokens * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    runner = ModelRunner(RunnerConfig(model=a.model, kv_cache_memory=256 << 20), progress=False)
    print(f"# one thread for the model: {a.model} ({runner.describe()}) on {cpu_model()}, {runner.threads} threads")
    per_token_ms(runner, 8)  # warm-up
    one = [per_token_ms(runner, a.tokens) for _ in range(a.repeats)]
    torch.ones(512, 512) @ torch.ones(512, 512)  # the main thread's own OpenMP pool: a second one in the process
    two = [per_token_ms(runner, a.tokens) for _ in range(a.repeats)]
    print(f"model work on one thread:            {statistics.median(one):.1f} ms per token (runs: "
          + ", ".join(f"{x:.1f}" for x in one) + ")")
    print(f"after the main thread ran a matmul:  {statistics.median(two):.1f} ms per token (runs: "
          + ", ".join(f"{x:.1f}" for x in two) + f"): {statistics.median(two) / statistics.median(one):.2f}x")


if __name__ == "__main__":
    main()
