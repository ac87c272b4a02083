"""Progress for long prefills: a prompt that takes many steps to prefill says it is being worked on. In the
server, log lines (PrefillProgress); under `jitney generate`, progress bars on stderr (GenerateBars).

An 8K-token prompt prefilled in 512-token chunks on 2 cores takes over a minute, and nothing else would be logged
until its first token. The engine calls step() after each model step; a prompt whose prefill has run for at least
`interval_s` since it started (or since its last line) gets one line, and one more when its prefill ends:

    prefill req-7: 4,096 / 8,192 tokens (50%) after 44.1 s
    prefill req-7: 8,192 tokens in 88.3 s

Only counts and the request id are logged, never the prompt's text. Prompts prefilled within `interval_s` (nearly
all of them) log nothing.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from model_runner.sequence import Sequence

log = logging.getLogger("jitney.engine")
INTERVAL_S = 5.0


class PrefillProgress:
    def __init__(self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        # seq_id -> (sequence, when its prefill started, when it was last logged or None); only prompts still
        # prefilling after a step are here, and each leaves when its prefill ends or the sequence does.
        self._open: dict[int, tuple[Sequence, float, float | None]] = {}

    def step(self, scheduled: list[tuple[Sequence, int]], sampled: list[int | None], elapsed: float,
             request_id: Callable[[Sequence], str]) -> None:
        """After a model step that took `elapsed` seconds (the scheduler has advanced its sequences)."""
        now = self.clock()
        started = now - elapsed
        for (seq, _), token in zip(scheduled, sampled):
            entry = self._open.get(seq.seq_id)
            prefilling = token is None and seq.num_computed_tokens < len(seq)
            if entry is None and not prefilling:
                continue  # a decode step, or a prompt prefilled in one step
            first, last = (started, None) if entry is None else entry[1:]
            total = seq.num_prompt_tokens
            if not prefilling:  # its prefill ended this step
                del self._open[seq.seq_id]
                if last is not None:  # it said it was working: say it is done
                    log.info("prefill %s: %s tokens in %.1f s", request_id(seq), f"{total:,}", now - first)
                continue
            if now - (first if last is None else last) >= self.interval_s:
                done = min(seq.num_computed_tokens, total)
                log.info("prefill %s: %s / %s tokens (%d%%) after %.1f s", request_id(seq), f"{done:,}",
                         f"{total:,}", 100 * done // total, now - first)
                last = now
            self._open[seq.seq_id] = (seq, first, last)
        for seq_id in [k for k, (seq, _, _) in self._open.items() if seq.is_finished]:  # aborted mid-prefill
            del self._open[seq_id]


class GenerateBars:
    """`jitney generate`'s bars on stderr: the prompt's tokens prefilled, then the tokens generated, one after the
    other. Shown when stderr is a terminal or the prompt takes more than one step (then even a log file shows it
    is working); also the time of the first token, for the summary line. Call it after each step."""

    def __init__(self, prompt_tokens: int, max_tokens: int, chunk: int, show: bool | None = None):
        self.show = sys.stderr.isatty() or prompt_tokens > chunk if show is None else show
        self.totals = (prompt_tokens, max_tokens)
        self.bar = None  # the prefill bar, then the generation bar
        self.first_token: float | None = None

    def _open(self, desc: str, total: int):
        from tqdm import tqdm
        if self.bar is not None:
            self.bar.close()
        # On a terminal the bar redraws in place; into a file or pipe each redraw is another line: every 5 s.
        self.bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not self.show,
                        dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 5.0)

    def __call__(self, seqs: list[Sequence]) -> None:
        seq = seqs[0]
        if self.bar is None:
            self._open("prefill", self.totals[0])
        if self.first_token is None:
            self.bar.update(min(seq.num_computed_tokens, seq.num_prompt_tokens) - self.bar.n)
            if not seq.num_output_tokens:
                return
            self.first_token = time.perf_counter()
            self._open("generate", self.totals[1])
        self.bar.update(seq.num_output_tokens - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
