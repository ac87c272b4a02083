"""The batcher's knobs, in one place (the API and benchmarks fill this from their flags), checked once: a
BatcherConfig that exists is a valid one."""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum


class Policy(str, Enum):
    """The batching policy (scheduler.py says what each does). A str, so flags, JSON and labels keep the name;
    code compares members, so a misspelt name cannot pass silently as "not continuous"."""
    SEQUENTIAL = "sequential"
    STATIC = "static"
    DYNAMIC = "dynamic"
    CONTINUOUS = "continuous"

    def __str__(self) -> str:
        return self.value


POLICIES = tuple(p.value for p in Policy)  # the names, for command-line choices


@dataclass
class BatcherConfig:
    policy: Policy = Policy.CONTINUOUS  # a name is accepted and turned into its member
    # The window (Triton's max_queue_delay): arrivals are gathered this long, or until max_batch_size are
    # there, before they are released to the scheduler.
    max_wait_ms: float = 2.0
    max_batch_size: int = 32            # static/dynamic: the batch; every policy: the window's release size
    static_flush_ms: float = 1000.0     # static: how long a partial batch may wait for companions
    max_num_seqs: int = 128             # continuous: sequences running at once
    # Every policy: tokens in one forward (longer prompts are chunked). None: the runner's default, which the
    # engine fills in (model_runner/step_budget.py: 2048 for bfloat16 on AMX tile units, 512 elsewhere).
    max_num_batched_tokens: int | None = None
    max_queue: int = 1024               # requests waiting to start; beyond it new ones are refused (429)
    max_queued_tokens: int = 2_000_000  # prompt tokens waiting to start; beyond it new ones are refused
    max_rps: float | None = None        # admission rate limit (requests/second), None = unlimited
    timeout_s: float | None = None      # a request still waiting to start after this long fails (504)
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None    # KV blocks the engine may use; None = all the runner's cache holds

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy = Policy(self.policy)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")
        for name in ("max_batch_size", "max_num_seqs", "max_num_batched_tokens", "max_queue", "max_queued_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_wait_ms < 0 or self.static_flush_ms < 0:
            raise ValueError("max_wait_ms and static_flush_ms must be >= 0")

    def for_runner(self, runner) -> BatcherConfig:
        """This config with what it leaves to the runner filled in: the step budget (auto: the runner knows
        what a prompt token costs it)."""
        if self.max_num_batched_tokens is not None:
            return self
        return replace(self, max_num_batched_tokens=runner.default_max_num_batched_tokens()[0])

    @property
    def window_s(self) -> float:
        """How long the queue holds the first arrival of a group before releasing it."""
        if self.policy is Policy.STATIC:
            return self.static_flush_ms / 1000
        if self.policy is Policy.SEQUENTIAL:
            return 0.0
        return self.max_wait_ms / 1000
