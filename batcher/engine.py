"""The Engine: queue + scheduler + runner, and the loop that turns requests into model steps.

The loop lives on the asyncio event loop, but each model step runs on one dedicated engine thread
(run_in_executor), so HTTP handlers keep running while the model computes. Everything that changes scheduler
state (admission, aborts, deadlines, finishing) happens on the event loop between steps, so there are no
locks: an abort takes effect at the next step boundary, within one step.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from model_runner.errors import InvalidRequestError
from model_runner.runner import ModelRunner, StepLogprobs
from model_runner.sampler import TokenLogprob
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import FinishReason, Sequence

from .config import BatcherConfig
from .detokenizer import IncrementalDetokenizer
from .request_queue import Overloaded, RequestQueue
from .scheduler import Scheduler

log = logging.getLogger("jitney.engine")
MAX_N = 16  # parallel samples per request (OpenAI's n)


class EngineStopped(Exception):
    """The engine is shutting down and accepts no new requests."""


@dataclass
class Timings:
    """Monotonic seconds; None until the event has happened."""
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
    finished: bool = False
    finish_reason: str | None = None   # stop | length | abort, on the final output
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    timings: Timings | None = None
    error: str | None = None     # set when the request failed (e.g. "timeout"); the message is in `text`
    logprobs: list[TokenLogprob] | None = None   # one per token in token_ids, when the request asked for them
    # Once, on the first output, when asked for: one per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Request:
    def __init__(self, request_id: str, seq: Sequence, detok: IncrementalDetokenizer):
        self.request_id, self.seq, self.detok = request_id, seq, detok
        self.timings = Timings(arrival=time.monotonic())
        self.outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.done = False
        self.prompt_logprobs: dict[int, TokenLogprob] = {}  # by prompt index, gathered chunk by chunk
        self.prompt_logprobs_sent = False
        self.forks: list[Request] = []  # n > 1: the siblings waiting for this one's prompt to be computed
        self.forked = False             # a sibling: its prompt tokens are the first sample's, counted once


class RequestStream:
    """Async iterator over a request's outputs; the last one has finished=True."""

    def __init__(self, engine: "Engine", request: Request):
        self.engine, self.request, self.request_id = engine, request, request.request_id
        self._ended = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._ended:
            raise StopAsyncIteration
        out = await self.request.outputs.get()
        self._ended = out.finished
        return out

    def abort(self) -> None:
        self.engine.abort(self.request_id)


@dataclass
class StepRecord:
    start: float          # monotonic seconds
    seconds: float
    batch_size: int       # sequences in the step
    num_tokens: int       # tokens fed (prefill chunks + decodes)
    waiting: int          # requests waiting to start after the step was planned
    preempted: int
    kv_blocks_used: int   # blocks some sequence holds


@dataclass
class EngineStats:
    waiting: int
    running: int
    preemptions: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    steps: int
    mean_batch_size: float
    last_batch_size: int
    last_step_tokens: int
    prompt_tokens: int
    generation_tokens: int
    finished_by_reason: dict[str, int]


class Engine:
    def __init__(self, runner: ModelRunner, cfg: BatcherConfig | None = None, log_requests: bool = False,
                 record_steps: bool = False):
        self.runner, self.cfg = runner, (cfg or BatcherConfig()).validate()
        self.log_requests = log_requests
        # One StepRecord per model step when asked (benchmarks plot batch size and queue length over time).
        self.step_log: list[StepRecord] | None = [] if record_steps else None
        self.step_observers: list[Callable[[StepRecord], None]] = []  # e.g. the /metrics batch-size histogram
        runner.block_allocator.enable_prefix_caching = self.cfg.enable_prefix_caching
        self.scheduler = Scheduler(self.cfg, runner.block_allocator, runner.eos_token_ids, runner.max_model_len)
        self.queue = RequestQueue(self.cfg)
        self.requests: dict[str, Request] = {}
        self._by_seq: dict[int, Request] = {}
        self._aborts: set[str] = set()
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jitney-engine")
        self._task: asyncio.Task | None = None
        self.accepting = True
        self.steps = self.prompt_tokens = self.generation_tokens = 0
        self.last_batch_size = self.last_step_tokens = self.batch_size_sum = 0
        self.finished_by_reason: dict[str, int] = {}
        self.step_seconds = 0.0  # EWMA of a step's wall time: the retry hint's unit

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        # Everything alive now (torch, transformers, the model, the tokenizer) lives for the whole run: move it
        # out of the collector's sight. Otherwise each full collection walks it all, a 60-180 ms pause that
        # lands on whichever requests are in flight (measured: p99 150 ms -> see README).
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self._loop(), name="jitney-engine-loop")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stops accepting; lets in-flight requests finish for up to grace_s; aborts the rest; ends the loop."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        while self.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for rid in list(self.requests):
            self.abort(rid)
        while self.requests and self.alive:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    # --- requests -----------------------------------------------------------------------------------------

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None) -> RequestStream:
        """Validates and enqueues a request, or raises at once: InvalidRequestError, Overloaded, EngineStopped."""
        return (await self.add_parallel_requests(prompt_token_ids, params, 1, request_id))[0]

    async def add_parallel_requests(self, prompt_token_ids: list[int], params: SamplingParams, n: int,
                                    request_id: str | None = None) -> list[RequestStream]:
        """n samples of one prompt (OpenAI's n), one stream each. The first sample prefills the prompt; when it
        samples its first token the others fork from it: they take its full prompt blocks by reference count
        (no copy, no recompute) and compute only the last, partial block themselves. Sample i draws from
        seed + i when a seed is given. Raises like add_request."""
        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        if not (isinstance(n, int) and 1 <= n <= MAX_N):
            raise InvalidRequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}")
        params.validate()
        self.runner.check_prompt(prompt_token_ids)
        self.runner.check_params(params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
        if any(rid in self.requests for rid in ids):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._check_capacity(len(prompt_token_ids))
        await self.queue.throttle()
        reqs = []
        for i, rid in enumerate(ids):
            p = params if i == 0 or params.seed is None else replace(params, seed=(params.seed + i) % 2**63)
            seq = Sequence(prompt_token_ids, p)
            req = Request(rid, seq, IncrementalDetokenizer(self.runner.tokenizer, prompt_token_ids, stop=p.stop))
            self.requests[rid] = req
            self._by_seq[seq.seq_id] = req
            reqs.append(req)
        first = reqs[0]
        first.forks = reqs[1:]
        for r in first.forks:
            r.forked = True
        self.queue.put(first, len(prompt_token_ids), self.cfg.timeout_s)
        if self.log_requests:
            log.info("request %s: %d prompt tokens, n %d, params %s, prompt %r", request_id, len(prompt_token_ids),
                     n, params, self.runner.tokenizer.decode(prompt_token_ids))
        self._wake.set()
        return [RequestStream(self, r) for r in reqs]

    def _fork(self, plan, sampled: list[int | None]) -> None:
        """Starts the siblings of every sequence that just sampled its first token (its prompt's K/V are all
        written now): each shares the prompt's full blocks, as a prefix-cache hit would, and is scheduled next."""
        bs, alloc = self.runner.block_size, self.runner.block_allocator
        for (seq, _), token in zip(plan.scheduled, sampled):
            req = self._by_seq.get(seq.seq_id)
            if token is None or req is None or not req.forks:
                continue
            forks, req.forks = req.forks, []
            if (lps := self.runner.step_logprobs.get(seq.seq_id)) is not None:
                req.prompt_logprobs.update(lps.prompt)  # siblings compute only the tail: they share the rest
            # The last prompt token is always computed by each sibling: its logits are that sibling's first draw.
            shared = seq.block_table[:(seq.num_prompt_tokens - 1) // bs]
            for child in forks:
                if child.done:
                    continue
                for b in shared:
                    alloc.share(b)
                child.seq.block_table = list(shared)
                child.seq.num_computed_tokens = len(shared) * bs
                child.timings.released = req.timings.released
                child.prompt_logprobs = dict(req.prompt_logprobs)
                self.scheduler.add_forked(child.seq)

    def _not_started(self) -> list[Sequence]:
        """Released to the scheduler but never run (preempted sequences, which have output, do not count)."""
        return [s for s in (*self.scheduler.waiting, *self.scheduler.batch) if s.num_output_tokens == 0]

    def _check_capacity(self, num_tokens: int) -> None:
        waiting = self._not_started()
        self.queue.check_capacity(num_tokens, len(waiting), sum(len(s) for s in waiting),
                                  max(self.step_seconds, 1e-3))

    def abort(self, request_id: str) -> None:
        if request_id in self.requests:
            self._aborts.add(request_id)
            self._wake.set()

    # --- the loop -----------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            self._between_steps(now)
            if not self.scheduler.has_work():
                nxt = self.queue.next_event()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), None if nxt is None else max(nxt - now, 0) + 1e-4)
                except TimeoutError:
                    pass
                continue
            plan = self.scheduler.schedule()
            for seq in plan.finished:  # outgrew the whole KV cache
                self._finish(self._by_seq[seq.seq_id])
            if not plan.scheduled:
                await asyncio.sleep(0.001)
                continue
            t0 = time.monotonic()
            for seq in plan.admitted:
                req = self._by_seq[seq.seq_id]
                req.timings.scheduled = req.timings.scheduled or t0
            try:
                sampled = await loop.run_in_executor(self._executor, self.runner.execute, plan.scheduled)
            except Exception:  # a failed step fails its requests, not the server
                log.exception("model step failed; failing its %d sequences", len(plan.scheduled))
                for seq, _ in plan.scheduled:
                    self._fail(self._by_seq[seq.seq_id], "internal error during the model step")
                continue
            elapsed = time.monotonic() - t0
            self.step_seconds = elapsed if not self.steps else 0.9 * self.step_seconds + 0.1 * elapsed
            self.steps += 1
            self.last_batch_size, self.last_step_tokens = len(plan.scheduled), plan.num_tokens
            self.batch_size_sum += len(plan.scheduled)
            if self.step_log is not None or self.step_observers:
                rec = StepRecord(t0, elapsed, len(plan.scheduled), plan.num_tokens, self.num_waiting,
                                 len(plan.preempted), self.runner.block_allocator.num_used)
                if self.step_log is not None:
                    self.step_log.append(rec)
                for observe in self.step_observers:
                    observe(rec)
            self._fork(plan, sampled)  # before update, which may end (and free) a sequence on its first token
            self.scheduler.update(plan, sampled)
            self._emit(plan, sampled, self.runner.step_logprobs)

    def _between_steps(self, now: float) -> None:
        """Admission, aborts and deadlines: every change to who is scheduled happens here, between steps."""
        for req in self.queue.release(now):
            req.timings.released = now
            self.scheduler.add(req.seq)
        if self._aborts:
            aborts, self._aborts = self._aborts, set()
            self.queue.remove(lambda p: p.item.request_id in aborts)
            for rid in aborts:
                if rid in self.requests:
                    req = self.requests[rid]
                    self.scheduler.finish(req.seq, FinishReason.ABORT)
                    self._finish(req)
        if self.cfg.timeout_s:
            message = f"timeout: not started within {self.cfg.timeout_s:g}s (server busy)"
            for req in self.queue.remove(lambda p: p.deadline is not None and p.deadline <= now):
                self._fail(req, message)
            for seq in self._not_started():
                req = self._by_seq[seq.seq_id]
                if req.timings.scheduled is None and now - req.timings.arrival >= self.cfg.timeout_s:
                    self._fail(req, message)

    def _emit(self, plan, sampled: list[int | None], step_logprobs: dict[int, StepLogprobs]) -> None:
        now = time.monotonic()
        for (seq, _), token in zip(plan.scheduled, sampled):
            req = self._by_seq[seq.seq_id]
            lps = step_logprobs.get(seq.seq_id)
            if lps is not None:
                req.prompt_logprobs.update(lps.prompt)  # a recomputed (preempted) prompt writes the same values
            if token is None:
                continue
            extra = self._logprob_fields(req, lps)
            if seq.params.max_tokens == 0:  # the prompt was only scored (the scheduler ended it): no token
                extra.pop("logprobs", None)
                self._finish(req, **extra)
                continue
            t = req.timings
            t.first_token = t.first_token or now
            t.token_times.append(now)
            self.generation_tokens += 1
            text = req.detok.push([token])
            if req.detok.stopped and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            if seq.is_finished:
                self._finish(req, text, [token], **extra)
            else:
                req.outputs.put_nowait(RequestOutput(req.request_id, text, [token], **extra))

    @staticmethod
    def _logprob_fields(req: Request, lps: StepLogprobs | None) -> dict:
        """The logprobs an output carries: the new token's, and the prompt's on the first output only."""
        extra = {}
        if lps is not None and lps.sampled is not None:
            extra["logprobs"] = [lps.sampled]
        if req.seq.params.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            req.prompt_logprobs_sent = True
            extra["prompt_logprobs"] = [None] + [req.prompt_logprobs.get(i)
                                                 for i in range(1, req.seq.num_prompt_tokens)]
        return extra

    def _finish(self, req: Request, text: str = "", token_ids: list[int] | None = None,
                logprobs: list[TokenLogprob] | None = None,
                prompt_logprobs: list[TokenLogprob | None] | None = None) -> None:
        if req.done:
            return
        req.done = True
        seq = req.seq
        req.timings.finished = time.monotonic()
        reason = (seq.finish_reason or FinishReason.ABORT).value
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        self.prompt_tokens += 0 if req.forked else seq.num_prompt_tokens
        text += req.detok.flush()
        req.outputs.put_nowait(RequestOutput(req.request_id, text, token_ids or [], True, reason,
                                             seq.num_prompt_tokens, seq.num_output_tokens, req.timings,
                                             logprobs=logprobs, prompt_logprobs=prompt_logprobs))
        self._forget(req)
        for sibling in self._unforked(req):  # ended before its prompt was computed: so do the others
            self.scheduler.finish(sibling.seq, FinishReason.ABORT)
            self._finish(sibling)
        if self.log_requests:
            log.info("request %s finished (%s): %r", req.request_id, reason, req.detok.text)

    @staticmethod
    def _unforked(req: Request) -> list[Request]:
        forks, req.forks = req.forks, []
        return forks

    def _fail(self, req: Request, message: str) -> None:
        if req.done:
            return
        req.done = True
        self.scheduler.finish(req.seq, FinishReason.ABORT)
        req.timings.finished = time.monotonic()
        self.finished_by_reason["error"] = self.finished_by_reason.get("error", 0) + 1
        kind = "timeout" if message.startswith("timeout") else "internal"
        req.outputs.put_nowait(RequestOutput(req.request_id, message, [], True, "abort", req.seq.num_prompt_tokens,
                                             req.seq.num_output_tokens, req.timings, error=kind))
        self._forget(req)
        for sibling in self._unforked(req):
            self._fail(sibling, message)

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self._by_seq.pop(req.seq.seq_id, None)

    # --- statistics ---------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.queue.pending) + len(self.scheduler.waiting) + len(self.scheduler.batch)

    def stats(self) -> EngineStats:
        alloc, s = self.runner.block_allocator, self.scheduler.stats
        return EngineStats(
            waiting=self.num_waiting,
            running=len(self.scheduler.running), preemptions=s.preemptions, kv_blocks_used=alloc.num_used,
            kv_blocks_total=alloc.num_blocks,
            prefix_cache_hit_rate=s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
            steps=self.steps, mean_batch_size=self.batch_size_sum / self.steps if self.steps else 0.0,
            last_batch_size=self.last_batch_size, last_step_tokens=self.last_step_tokens,
            prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens,
            finished_by_reason=dict(self.finished_by_reason))

    # --- for replicas/: what one replica reports to the router in front of it (the only such method) --------

    def replica_snapshot(self) -> dict:
        """stats(), the prefix-cache counters behind its hit rate (rates do not add up across replicas, counts
        do), and the hash of every full block a prefix lookup can find now (held or in the free list)."""
        s = self.scheduler.stats
        return {"stats": self.stats(), "prefix_queries": s.prefix_queries, "prefix_hits": s.prefix_hits,
                "cached_block_hashes": list(self.runner.block_allocator.cached)}


__all__ = ["Engine", "EngineStopped", "Overloaded", "RequestOutput", "RequestStream", "StepRecord",
           "Timings"]
