"""What a workload is to `jitney bench`: a named way to make a trace, its preset flags, and its own flags."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from ..trace import TraceRequest, offered_rate, rescale_time


class WorkloadError(ValueError):
    """A workload that cannot do what was asked (a burst has no rate to sweep): a message, not a traceback."""


@dataclass(frozen=True)
class Workload:
    name: str
    help: str
    # (trace, the sentence every report prints about it: counts, arrivals, lengths, scales)
    build: Callable[[argparse.Namespace], tuple[list[TraceRequest], str]]
    # Preset values of the shared trace flags (num_requests, rate, prompt_len, output_len): flags given win.
    presets: dict = field(default_factory=dict)
    # Flags of this workload alone (an Azure window, a gamma shape), added to the bench's parser.
    add_args: Callable[[argparse._ArgumentGroup], None] | None = None
    # The same requests offered at another rate (a rate sweep); None: re-time the built trace's gaps.
    at_rate: Callable[[argparse.Namespace, float], list[TraceRequest]] | None = None
    # A published figure of another engine on exactly this workload, printed beside ours (None: none).
    reference: Callable[[argparse.Namespace], str | None] | None = None

    def retimed(self, args: argparse.Namespace, trace: list[TraceRequest], rate: float) -> list[TraceRequest]:
        if self.at_rate is not None:
            return self.at_rate(args, rate)
        if (base := offered_rate(trace)) is None:
            raise WorkloadError(f"the {self.name} workload arrives all at once: it has no rate to sweep")
        return rescale_time(trace, base / rate)
