"""The workloads `jitney bench --workload NAME` replays: a small registry, one line per workload.

To add one, write a module here that builds a `Workload` (see base.py: a name, a function from the parsed
flags to a trace and its description, the preset flag values, its own flags) and list it below.
"""
from .base import Workload, WorkloadError
from .recorded import AZURE, JSONL
from .synthetic import BURST_WORKLOAD, GAMMA, POISSON

WORKLOADS: dict[str, Workload] = {w.name: w for w in (POISSON, GAMMA, BURST_WORKLOAD, AZURE, JSONL)}

__all__ = ["WORKLOADS", "Workload", "WorkloadError"]
