"""The model runner in a simulation: the real runner's step interface, no computation.

SimRunner.execute(scheduled) returns what the real runner would hand back (a StepOutput: a token for every
sequence whose chunk reaches its last token, None mid-prompt) and charges the virtual clock the step's modelled
cost. The engine cannot tell the difference: the same scheduler and KV-cache manager decide every step.

Which tokens: a fixed function of the sequence's last token (never an end-of-sequence id), so, as under greedy
decoding, two sequences with identical histories produce identical outputs and the prefix cache finds the same
blocks it would for real. How many: the request's own rules (max_tokens, ignore_eos, the context window), so a
trace's output lengths are served exactly (replay forces them with ignore_eos).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from model_runner.config import ModelConfig
from model_runner.runner import ModelRunner, StepOutput
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence
from model_runner.step_budget import default_max_num_batched_tokens

from .cost import StepCost, StepPlan
from .loop import VirtualClock


# What `jitney serve`'s --max-num-batched-tokens auto takes on a GPU, the device a hardware sheet models.
GPU_BUDGET = default_max_num_batched_tokens("cuda", torch.bfloat16, "none")


class SimTokenizer:
    """A word-level tokenizer over the model's vocabulary: a word's id is a hash of it, a token's text one
    character. Replay makes prompts of exact lengths from it (one id per word), and the detokenizer's work per
    token stays a few microseconds: no real vocabulary is needed to schedule."""

    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [zlib.crc32(w.encode()) % self.vocab_size for w in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False
               ) -> str:
        return "x" * len(ids)


@dataclass
class StepLog:
    """What each simulated step did, for the device's utilisation over time."""
    start: list[float]
    cost: list[StepCost]


class SimRunner:
    """Stands in for ModelRunner in Engine: the attributes the engine reads, and execute()."""

    def __init__(self, mc: ModelConfig, cost_model, clock: VirtualClock, num_blocks: int, block_size: int,
                 max_model_len: int | None = None, description: str = "", budget: tuple[int, str] | None = None):
        """budget: the step budget (and why) `auto` takes on the modelled device (default: a GPU's)."""
        self.model_config, self.cost_model, self.clock = mc, cost_model, clock
        self.budget = budget or GPU_BUDGET
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_model_len = min(max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_token_ids = tuple(mc.eos_token_ids)
        self.tokenizer = SimTokenizer(mc.vocab_size)
        self.threads = 1            # the engine's step thread is never started: steps run inline
        self.description = description
        self.steps = StepLog([], [])

    # The real runner's refusals, on this runner's sizes (one copy of each rule).
    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        ModelRunner.check_prompt(self, prompt_token_ids)

    def check_params(self, params: SamplingParams) -> None:
        ModelRunner.check_params(self, params)

    def describe(self) -> str:
        return self.description

    def default_max_num_batched_tokens(self) -> tuple[int, str]:
        return self.budget

    def next_token(self, seq: Sequence) -> int:
        vocab, token = self.model_config.vocab_size, seq.token_ids[-1]
        while True:
            token = (token * 1103515245 + 12345) % vocab
            if token not in self.eos_token_ids:
                return token

    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepOutput:
        cost = self.cost_model.cost(StepPlan.of(scheduled))
        self.steps.start.append(self.clock())
        self.steps.cost.append(cost)
        self.clock.charge(cost.seconds)
        return StepOutput([self.next_token(seq) if seq.num_computed_tokens + n == len(seq.token_ids) else None
                           for seq, n in scheduled])


class ChargedRunner:
    """A real runner whose steps take the modelled time on the virtual clock instead of their own: the real
    model computes the tokens, the cost model says how long that took. Tests compare it with SimRunner."""

    def __init__(self, runner: ModelRunner, cost_model, clock: VirtualClock):
        self._runner, self.cost_model, self.clock = runner, cost_model, clock

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepOutput:
        cost = self.cost_model.cost(StepPlan.of(scheduled))  # before the step: it changes no Sequence, but be plain
        step = self._runner.execute(scheduled)
        self.clock.charge(cost.seconds)
        return step
