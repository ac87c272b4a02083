"""What a caller of the engine sees: the outputs of a request, their timings, why a request ended, its stream."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from model_runner.sampler import TokenLogprob
from model_runner.sequence import EndReason, Sequence

from .clock import REAL_CLOCK, Clock
from .detokenizer import IncrementalDetokenizer


@dataclass
class Timings:
    """Seconds on the engine's clock (batcher/clock.py); None until the event has happened."""
    arrival: float
    released: float | None = None      # left the batching window
    scheduled: float | None = None     # first admitted to a step
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)

    def ms(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else 1000 * (b - a)

    @property
    def queue_ms(self) -> float | None:
        return self.ms(self.arrival, self.scheduled)

    @property
    def ttft_ms(self) -> float | None:
        return self.ms(self.arrival, self.first_token)

    @property
    def total_ms(self) -> float | None:
        return self.ms(self.arrival, self.finished)

    @property
    def inter_token_ms(self) -> list[float]:
        t = self.token_times
        return [1000 * (b - a) for a, b in zip(t, t[1:])]


@dataclass
class RequestOutput:
    request_id: str
    text: str                    # new text since the previous output (UTF-8-complete, stop strings cut)
    token_ids: list[int]         # new token ids since the previous output
    ended: EndReason | None = None     # on the final output: why the request ended
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None   # one per token in token_ids, when the request asked for them
    # Once, on the first output, when asked for: one per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.ended is not None

    @property
    def finish_reason(self) -> str | None:
        """stop | length | abort, on the final output."""
        return self.ended.finish_reason if self.ended else None

    @property
    def error(self) -> str | None:
        """timeout | shutdown | internal | unavailable | invalid_output when the request failed; the message (for
        timeout, internal, invalid_output) is in text."""
        return self.ended.error if self.ended else None


class Request:
    """The engine's record of one request (one sample of it, when n > 1)."""

    def __init__(self, request_id: str, seq: Sequence, detok: IncrementalDetokenizer, timeout_s: float | None,
                 clock: Clock = REAL_CLOCK):
        self.request_id, self.seq, self.detok = request_id, seq, detok
        self.timings = Timings(arrival=clock())
        self.deadline = self.timings.arrival + timeout_s if timeout_s else None  # to start by, else it times out
        self.outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.done = False
        self.prompt_logprobs: dict[int, TokenLogprob] = {}  # by prompt index, gathered chunk by chunk
        self.prompt_logprobs_sent = False
        self.forks: list[Request] = []  # n > 1: the siblings waiting for this one's prompt to be computed
        self.forked = False             # a sibling: its prompt tokens are the first sample's, counted once

    def __repr__(self) -> str:
        return f"Request({self.request_id!r}, {self.seq!r}{', done' if self.done else ''})"


class RequestStream:
    """Async iterator over a request's outputs; the last one has finished=True."""

    def __init__(self, request: Request, abort: Callable[[str], None]):
        self.request, self.request_id, self._abort = request, request.request_id, abort
        self._ended = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._ended:
            raise StopAsyncIteration
        out = await self.request.outputs.get()
        self._ended = out.finished
        return out

    def abort(self) -> None:
        """Asks the engine to end the request (it ends at the next step boundary, its last output says so)."""
        self._abort(self.request_id)
