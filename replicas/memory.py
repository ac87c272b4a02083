"""How much KV cache each replica of a local Ray gets: N replicas share one host's memory.

One process takes a fixed KV budget (2 GiB on the CPU). N replicas each taking it can pass the host's memory,
and then Ray's memory monitor kills them (it kills a worker once the node's used memory passes
RAY_memory_usage_threshold, 0.95 of it by default). So, for replicas of a Ray started here:
  - each replica costs its KV cache plus a footprint measured apart from the KV cache (below);
  - the memory to share is what the host has available now less what Ray's monitor keeps free;
  - by default each replica gets min(the one-process budget, its share of what is left after the N footprints),
    where the one-process budget is raised to one whole context if it is smaller (a long --max-model-len);
  - an explicit --kv-cache-memory still wins, but N x (it + the footprint) past that memory is refused up front;
  - a budget that cannot hold one whole context (max_model_len tokens) is refused: a long prompt would never run.
Replicas on a cluster (--ray-address) land on other machines whose memory this host cannot see: they keep the
one-process default (or --kv-cache-memory).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from model_runner.config import RunnerConfig
from model_runner.errors import InvalidRequestError

# A replica apart from its KV cache, measured on an AMD EPYC Zen 3 VM (2 cores, torch 2.13, ray 2.60): a process
# that imports ray.serve, builds ModelRunner(RunnerConfig(model, dtype="float32", kv_cache_memory=256 MiB)) and
# generates 32 tokens for 8 prompts of 101 tokens, then reads its RSS (psutil). tiny-random (weights ~0): 666 MiB
# with 256 MiB of KV -> 409 MiB of runtime. SmolLM2-135M (513 MiB of weights as served): 1,773 MiB with 255 MiB
# of KV -> 1,004 MiB besides the KV, 595 MiB more than tiny: the weights' load-time and packed copies, ~1.2x them.
RUNTIME_BYTES = 410 << 20
WEIGHT_COPIES = 2.2
GiB = 2**30


@dataclass(frozen=True)
class KVPlan:
    kv_bytes: int   # each replica's KV budget
    note: str       # how it was chosen, for the start-up line


def footprint(weight_bytes: int) -> int:
    """A replica's memory besides its KV cache."""
    return RUNTIME_BYTES + int(WEIGHT_COPIES * weight_bytes)


def plan_kv(replicas: int, available: int, total: int, weight_bytes: int, context_bytes: int,
            asked: int | None, default: int, threshold: float = 0.95) -> KVPlan:
    """Each replica's KV budget on a host with `available` bytes free now out of `total` (pure arithmetic).

    context_bytes: the KV one full context takes (the least a replica can serve with)."""
    usable = available - int((1 - threshold) * total)  # Ray's monitor starts killing past threshold x total
    each = footprint(weight_bytes)
    left = usable - replicas * each
    gib = lambda b: f"{b / GiB:.2f} GiB"
    if asked is not None:
        if replicas * (asked + each) > usable:
            raise InvalidRequestError(
                f"{replicas} replicas x (--kv-cache-memory {gib(asked)} + {gib(each)} of weights and runtime) = "
                f"{gib(replicas * (asked + each))}, more than this host's {gib(usable)} to spare ({gib(available)} "
                f"available, less the {1 - threshold:.0%} Ray's memory monitor keeps free): lower "
                f"--kv-cache-memory or --replicas")
        return KVPlan(asked, f"--kv-cache-memory {gib(asked)} each")
    cap = max(default, context_bytes)  # the default never refuses a context the host holds
    kv = min(cap, left // replicas) if left > 0 else 0
    if kv < context_bytes:
        raise InvalidRequestError(
            f"{replicas} replicas do not fit this host: each needs {gib(each)} of weights and runtime and at least "
            f"{gib(context_bytes)} of KV cache (one whole context), and {gib(usable)} is to spare "
            f"({gib(available)} available, less the {1 - threshold:.0%} Ray's memory monitor keeps free): lower "
            f"--replicas or --max-model-len")
    if kv == default:
        how = "the one-process default, which fits"
    elif kv == cap:
        how = "one whole context, above the one-process default"
    else:
        how = f"sized: {gib(usable)} to spare on this host, less {gib(each)} of weights and runtime each, shared by " \
              f"{replicas}"
    return KVPlan(kv, f"KV cache {gib(kv)} each ({how})")


def model_bytes(cfg: RunnerConfig) -> tuple[int, int]:
    """(the weights as served, the KV bytes of one whole context) for cfg's model, read from its headers
    (a GGUF is converted first, once, as the replicas would)."""
    from model_runner.checkpoint import check_weights
    from model_runner.config import ModelConfig
    from model_runner.loader import plan_memory, resolve_model
    path = resolve_model(cfg.model, progress=False)
    mc = ModelConfig.from_hf_dir(path)
    one_block = plan_memory(mc, check_weights(path, mc), replace(cfg, kv_cache_memory=1))  # a budget of 1: 1 block
    positions = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    return one_block.weight_bytes, -(-positions // cfg.block_size) * one_block.kv_bytes


def host_memory_now() -> tuple[int, int]:
    """(available, total) bytes: the host's, or its cgroup's where that is tighter."""
    import psutil
    vm = psutil.virtual_memory()
    available, total = vm.available, vm.total
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit.isdigit():
            total, available = min(total, int(limit)), min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available, total


def threshold() -> float:
    """Ray's memory monitor threshold, as Ray reads it."""
    try:
        return float(os.environ.get("RAY_memory_usage_threshold", "0.95"))
    except ValueError:
        return 0.95
