"""--max-num-batched-tokens auto (model_runner/step_budget.py): 2048 on exactly one class of runner, bfloat16
weights (unquantized, or a quantized model's kept dense ones) on a CPU whose flags list AMX bfloat16 tiles (and not left out by JITNEY_ISA), 512 on every other
combination of device, dtype, quantization and CPU; the engine fills an unset budget from its runner and keeps a
given one; the flag reads `auto` as unset and refuses what is neither it nor a count."""
from __future__ import annotations

import argparse
import itertools

import pytest
import torch

from api import flags
from batcher.config import BatcherConfig
from batcher.engine import Engine
from model_runner import precision, step_budget

# CPU kinds by the flags that matter, as /proc/cpuinfo lists them.
CPUS = {"xeon-amx": {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"},
        "zen4": {"avx2", "fma", "avx512f", "avx512_bf16"}, "zen3": {"avx2", "fma"}, "arm": {"asimd", "bf16"},
        "none": set()}


@pytest.mark.parametrize("device,dtype,quantization,cpu,resident", list(itertools.product(
    ["cpu", "cuda", "cuda:1"], [torch.float32, torch.bfloat16, torch.float16], ["none", "int8", "q4"], CPUS,
    [False, True])))
def test_auto_is_2048_only_for_bfloat16_weights_on_amx(monkeypatch, device, dtype, quantization, cpu, resident):
    """Unquantized, or quantized with the dense path's bfloat16 weights kept (--quant-dense-weights resident)."""
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: frozenset(CPUS[cpu]))
    monkeypatch.delenv("JITNEY_ISA", raising=False)
    budget, why = step_budget.default_max_num_batched_tokens(device, dtype, quantization, resident)
    cheap = device == "cpu" and dtype == torch.bfloat16 and (quantization == "none" or resident) \
        and cpu == "xeon-amx"
    assert budget == (step_budget.CHEAP_PROMPTS if cheap else step_budget.DEFAULT)
    assert why.startswith("auto: ") and len(why) > len("auto: ")


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_an_amx_xeon_standing_in_for_a_lesser_cpu_takes_its_budget(monkeypatch, isa):
    """JITNEY_ISA=avx512 / avx2 make an AMX Xeon choose as a Zen 4 / an AVX2 machine would: 512."""
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: frozenset(CPUS["xeon-amx"]))
    monkeypatch.setenv("JITNEY_ISA", isa)
    assert step_budget.default_max_num_batched_tokens("cpu", torch.bfloat16, "none")[0] == step_budget.DEFAULT


def test_the_engine_fills_an_unset_budget_from_its_runner_and_keeps_a_given_one(tiny_runner, monkeypatch):
    own = tiny_runner.default_max_num_batched_tokens()[0]
    assert own == step_budget.default_max_num_batched_tokens(tiny_runner.device, tiny_runner.dtype, "none")[0]
    assert BatcherConfig().max_num_batched_tokens is None
    assert Engine(tiny_runner, BatcherConfig()).cfg.max_num_batched_tokens == own
    assert Engine(tiny_runner).scheduler.cfg.max_num_batched_tokens == own
    assert Engine(tiny_runner, BatcherConfig(max_num_batched_tokens=7)).cfg.max_num_batched_tokens == 7
    monkeypatch.setattr(tiny_runner, "default_max_num_batched_tokens", lambda: (2048, "auto: asked"))
    assert Engine(tiny_runner, BatcherConfig(policy="static")).scheduler.cfg.max_num_batched_tokens == 2048


@pytest.mark.parametrize("text,value", [("auto", None), (" auto ", None), ("1", 1), ("2048", 2048)])
def test_the_flag_reads_auto_or_a_count(text, value):
    assert flags.auto_or(flags.integer(1))(text) == value


@pytest.mark.parametrize("text", ["", " ", "0", "-1", "Auto", "auto2", "nan", "512.5"])
def test_the_flag_refuses_anything_else(text):
    with pytest.raises(argparse.ArgumentTypeError):
        flags.auto_or(flags.integer(1))(text)


def test_a_scheduler_refuses_a_budget_nobody_filled_in():
    from batcher.scheduler import Scheduler
    with pytest.raises(ValueError, match="for_runner"):
        Scheduler(BatcherConfig(), 8, 4, (0,), max_model_len=64)
