"""RemoteEngine: the EngineClient interface (batcher/engine_client.py), served by replicas over a Serve handle.

The HTTP layer stays the same code: it tokenizes and validates here, in the front end, then calls
add_parallel_requests(), which sends the request to the replica the router picks and hands back one stream per
sample. The replica's first answer says whether it took the request (raised here as the local engine raises:
InvalidRequestError, Overloaded, EngineStopped) and which replica it is (stream.replica, sent to the client as
x-jitney-replica). If the replica dies or cannot be reached mid-request, every unfinished stream ends with an
error output (error "unavailable": a 503 before the first token, an error event after it); nothing waits on
a replica that is gone. A response_format travels as its schema's text and is compiled on the replica that runs
the request (a compiled grammar is native state that cannot be pickled).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

from batcher.engine_client import EngineStopped
from batcher.engine_client import ModelInfo
from batcher.request_queue import Overloaded
from batcher.request import EndReason, RequestOutput
from batcher.stats import EngineStats
from model_runner.errors import InvalidRequestError
from model_runner.grammar import GrammarError
from model_runner.sampling_params import SamplingParams

from .deployment import Accepted, Refused
from .board import replica_reports

log = logging.getLogger("jitney.replicas")


class RemoteStream:
    """One sample's outputs, as batcher's RequestStream: async iteration, the last has finished=True."""

    def __init__(self, call: "RemoteCall", request_id: str):
        self.call, self.request_id = call, request_id
        self.outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        self._ended = False

    @property
    def replica(self) -> str:
        return self.call.replica

    def __aiter__(self) -> "RemoteStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._ended:
            raise StopAsyncIteration
        out = await self.outputs.get()
        self._ended = out.finished
        return out

    def abort(self) -> None:
        self.call.cancel()

    def end(self, text: str, ended: EndReason) -> None:
        if not self.finished:
            self.finished = True
            self.outputs.put_nowait(RequestOutput(self.request_id, text, [], ended=ended))


class RemoteCall:
    """One request on one replica: the Serve response generator and the task that reads it."""

    def __init__(self, request_id: str, gen, replica: str, n: int):
        self.request_id, self.gen, self.replica = request_id, gen, replica
        ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
        self.streams = [RemoteStream(self, rid) for rid in ids]
        self.task: asyncio.Task | None = None
        self.reason: EndReason | None = None  # why it was cancelled here: the first reason given wins

    def cancel(self, reason: EndReason = EndReason.ABORTED) -> None:
        if self.task is not None and not self.task.done():
            self.reason = self.reason or reason
            self.task.cancel()

    async def pump(self) -> None:
        try:
            async for batch in self.gen:
                for i, out in batch:
                    s = self.streams[i]
                    s.finished = s.finished or out.finished
                    s.outputs.put_nowait(out)
        except asyncio.CancelledError:  # aborted here (client gone, drain): the replica aborts it too
            self.gen.cancel()
            for s in self.streams:
                s.end("", self.reason or EndReason.ABORTED)
            raise
        except Exception as e:  # the replica died or became unreachable mid-request
            log.warning("request %s on replica %s failed: %s", self.request_id, self.replica, type(e).__name__)
            for s in self.streams:
                s.end(f"the replica serving this request ({self.replica}) failed; retry the request",
                      EndReason.UNAVAILABLE)
        else:
            for s in self.streams:  # a replica stopped mid-way ends its streams itself; this is a safety net
                s.end("the replica ended the request early", EndReason.UNAVAILABLE)

    def closed(self, task: asyncio.Task) -> None:
        """The pump's end, whatever it was. A task cancelled before its first step never runs pump's handlers:
        its streams end here, with the reason it was cancelled for."""
        if task.cancelled() and any(not s.finished for s in self.streams):
            self.gen.cancel()
            for s in self.streams:
                s.end("", self.reason or EndReason.ABORTED)


class RemoteEngine:
    def __init__(self, handle, info: dict):
        """info: a replica's JitneyReplica.info() (every replica runs the same model and configuration)."""
        self.handle = handle.options(stream=True)
        self.model_info: ModelInfo = info["model_info"]
        self.tokenizer = info["tokenizer"]  # the front end tokenizes and renders chat; the model runs in replicas
        self._config_info = info["config_info"]
        self.accepting = True
        self.requests: dict[str, RemoteCall] = {}
        self.step_observers: list = []  # steps happen in the replicas; they report their own histograms
        self._ids = itertools.count()
        self._state = "new"

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._state = "running"

    async def warm_up(self) -> None:
        """Nothing here: each replica warms its own grammar compiler as it starts."""

    @property
    def alive(self) -> bool:
        return self._state == "running"

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stops accepting; lets requests in flight (on every replica) finish for up to grace_s; aborts the
        rest. The replicas themselves are deleted after the server has closed (launch.py)."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        while self.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for call in list(self.requests.values()):
            call.cancel(EndReason.SHUT_DOWN)  # as the local engine: the client is told the server cut it
        while self.requests:
            await asyncio.sleep(0.01)
        self._state = "stopped"

    # --- requests -----------------------------------------------------------------------------------------

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None) -> RemoteStream:
        return (await self.add_parallel_requests(prompt_token_ids, params, 1, request_id))[0]

    async def add_parallel_requests(self, prompt_token_ids: list[int], params: SamplingParams, n: int,
                                    request_id: str | None = None) -> list[RemoteStream]:
        from ray.serve.exceptions import BackPressureError

        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        params.validate()  # here, as the local engine does: a bad parameter is the front end's 422, not a replica's
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        gen = self.handle.generate.remote(prompt_token_ids, params, n)
        try:
            first = await gen.__anext__()
        except BackPressureError as e:  # the front end's own bounded queue (max_queued_requests) is full
            gen.cancel()
            raise Overloaded(f"server overloaded: {e}", retry_after=1.0) from None
        except Exception as e:  # no replica could take it, or the one chosen died before answering
            gen.cancel()
            log.warning("request %s: no replica answered: %s", request_id, type(e).__name__)
            call = RemoteCall(request_id, gen, "", n)
            for s in call.streams:
                s.end("no replica could take the request (one may be restarting); retry it", EndReason.UNAVAILABLE)
            return call.streams
        if isinstance(first, Refused):
            if first.kind == "invalid_schema":
                raise GrammarError(first.message)
            if first.kind == "invalid":
                raise InvalidRequestError(first.message)
            if first.kind == "overloaded":
                raise Overloaded(first.message, first.retry_after)
            raise EngineStopped(first.message)
        assert isinstance(first, Accepted), first
        call = RemoteCall(request_id, gen, first.replica, n)
        self.requests[request_id] = call
        call.task = asyncio.create_task(call.pump(), name=f"jitney-remote-{request_id}")
        call.task.add_done_callback(call.closed)
        call.task.add_done_callback(lambda _: self.requests.pop(request_id, None))
        return call.streams

    def abort(self, request_id: str, reason: EndReason = EndReason.ABORTED) -> None:
        """Ends a request (all its samples) with `reason`, as Engine.abort: the client's cancel (ABORTED) or the
        server's shutdown (SHUT_DOWN, which the client is told as an error)."""
        if (call := self.requests.get(request_id)) is not None:
            call.cancel(reason)

    async def compile_grammar(self, source: str) -> str:
        """The schema's text itself: the replica that runs the request compiles it (Engine.add_parallel_requests),
        and a schema it cannot enforce comes back as GrammarError from add_parallel_requests."""
        return source

    # --- statistics ---------------------------------------------------------------------------------------

    def config_info(self) -> dict[str, dict[str, str]]:
        """A replica's, as Engine.config_info (every replica runs the same configuration; num_blocks is each
        replica's)."""
        return self._config_info

    def step_hub(self, max_viewers: int, buffer_events: int) -> None:
        """None: the steps run in the replicas, no one engine here to watch (the step stream answers 501)."""
        return None

    def stats(self) -> EngineStats:
        """Every replica's last report, added up (counters and gauges add; rates are recomputed from counts)."""
        reports = list(replica_reports().values())
        return merged_stats(reports)


def merged_stats(reports: list[dict]) -> EngineStats:
    stats = [r["stats"] for r in reports]

    def total(name: str) -> int:
        return sum(s[name] for s in stats)

    steps = total("steps")
    finished: dict[str, int] = {}
    for s in stats:
        for reason, k in s["finished_by_reason"].items():
            finished[reason] = finished.get(reason, 0) + k
    return EngineStats(
        waiting=total("waiting"), running=total("running"), preemptions=total("preemptions"),
        kv_blocks_used=total("kv_blocks_used"), kv_blocks_total=total("kv_blocks_total"),
        prefix_cache_queries=total("prefix_cache_queries"), prefix_cache_hits=total("prefix_cache_hits"),
        steps=steps, mean_batch_size=sum(s["mean_batch_size"] * s["steps"] for s in stats) / steps if steps else 0.0,
        last_batch_size=total("last_batch_size"), last_step_tokens=total("last_step_tokens"),
        prompt_tokens=total("prompt_tokens"), generation_tokens=total("generation_tokens"),
        finished_by_reason=finished)
