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
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property

from model_runner import threads
from model_runner.errors import InvalidRequestError
from model_runner.precision import dtype_name
from model_runner.runner import ModelRunner, StepLogprobs, StepOutput
from model_runner.sampler import TokenLogprob
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

from .clock import REAL_CLOCK, Clock
from .config import BatcherConfig
from .detokenizer import IncrementalDetokenizer
from .engine_client import MAX_N, EngineStopped, ModelInfo
from .grammars import CompileSlots
from .progress import PrefillProgress
from .request import EndReason, Request, RequestOutput, RequestStream
from .request_queue import RequestQueue
from .scheduler import Scheduler, SchedulerOutput
from .stats import Counters, EngineStats, StepRecord
from .step_view import StepHub

log = logging.getLogger("jitney.engine")


class Engine:
    """The model in this process, behind the EngineClient interface (batcher/engine_client.py)."""

    def __init__(self, runner: ModelRunner, cfg: BatcherConfig | None = None, log_requests: bool = False,
                 record_steps: bool = False, clock: Clock = REAL_CLOCK):
        self.runner, self.cfg = runner, (cfg or BatcherConfig()).for_runner(runner)
        # Every time stamp and window below reads this clock: a simulation (sim/) gives a virtual one and runs
        # the engine on an event loop whose time is that clock, with a runner that computes nothing.
        self.clock = clock
        self.log_requests = log_requests
        # One StepRecord per model step when asked (benchmarks plot batch size and queue length over time).
        self.counters = Counters(step_log=[] if record_steps else None)
        # The scheduler owns the blocks it schedules into (all of the runner's cache, or num_kv_blocks of it). While
        # this engine lives nothing else may use the runner's cache: the scheduler's manager describes what the
        # blocks hold, and another one's writes would silently falsify it.
        num_blocks = self.cfg.num_kv_blocks or runner.num_blocks
        if num_blocks > runner.num_blocks:
            raise ValueError(f"num_kv_blocks {num_blocks} does not fit the runner's cache ({runner.num_blocks} blocks)")
        self.scheduler = Scheduler(self.cfg, num_blocks, runner.block_size, runner.eos_token_ids, runner.max_model_len)
        self.queue = RequestQueue(self.cfg, clock)
        self.requests: dict[str, Request] = {}
        self._by_seq: dict[int, Request] = {}
        self._aborts: dict[str, EndReason] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        # Steps run on the process's torch thread, the one that loaded the model (model_runner/threads.py: a
        # second thread running OpenMP regions costs every step a sleep and a wake-up).
        self._executor = threads.torch_thread()
        self._task: asyncio.Task | None = None
        self.prefill_progress = PrefillProgress(clock=self.clock)  # a line every 5 s for so long a prefill
        self.accepting = True
        self._compiles = CompileSlots()

    # --- what the API reads: the tokenizer and the model's facts -------------------------------------------

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @cached_property
    def model_info(self) -> ModelInfo:
        r = self.runner
        return ModelInfo(str(r.cfg.model), r.max_model_len, r.model_config.vocab_size, r.block_size, r.describe())

    @property
    def step_log(self) -> list[StepRecord] | None:
        return self.counters.step_log

    @property
    def step_observers(self) -> list[Callable[[StepRecord], None]]:
        return self.counters.step_observers

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        # Everything alive now (torch, transformers, the model, the tokenizer) lives for the whole run: move it
        # out of the collector's sight. Otherwise each full collection walks it all, a 60-180 ms pause that
        # lands on whichever requests are in flight (docs/benchmarks.md: p99 160 ms without it).
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self._loop(), name="jitney-engine-loop")

    async def warm_up(self) -> None:
        """The grammar compiler's view of the vocabulary (0.3-0.9 s holding the GIL): built in a thread before the
        server answers, not by the first response_format request on the event loop."""
        await asyncio.to_thread(self.runner.grammars.prepare)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stops accepting; lets in-flight requests finish for up to grace_s; aborts the rest; ends the loop."""
        self.accepting = False
        deadline = self.clock() + grace_s
        while self.requests and self.clock() < deadline:
            await asyncio.sleep(0.02)
        for rid in list(self.requests):
            self.abort(rid, EndReason.SHUT_DOWN)
        while self.requests and self.alive:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

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
        self.scheduler.check_fits(len(prompt_token_ids))
        self.runner.check_params(params)
        if isinstance(params.grammar, str):  # a schema's text, shipped by a front end (replicas/): compiled here
            params = replace(params, grammar=await self.compile_grammar(params.grammar))
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
            detok = IncrementalDetokenizer(self.runner.tokenizer, prompt_token_ids, stop=p.stop)
            req = Request(rid, seq, detok, self.cfg.timeout_s, self.clock)
            self.requests[rid] = req
            self._by_seq[seq.seq_id] = req
            reqs.append(req)
        first = reqs[0]
        first.forks = reqs[1:]
        for r in first.forks:
            r.forked = True
        self.queue.put(first, len(prompt_token_ids))
        if self.log_requests:
            log.info("request %s: %d prompt tokens, n %d, params %s, prompt %r", request_id, len(prompt_token_ids),
                     n, params, self.runner.tokenizer.decode(prompt_token_ids))
        self._wake.set()
        return [RequestStream(r, self.abort) for r in reqs]

    async def compile_grammar(self, source: str):
        """response_format's schema (its GrammarCompiler.key text) compiled for this engine's runner: off the event
        loop, a few at once (batcher/grammars.py). Raises GrammarError or TooManyCompiles."""
        return await self._compiles.compile(self.runner.grammars, source)

    def _fork(self, plan: SchedulerOutput, step: StepOutput) -> None:
        """Starts the siblings of every sequence that just sampled its first token (its prompt's K/V are all
        written now): each shares the prompt's full blocks (Scheduler.fork) and is scheduled next."""
        for (seq, _), token in zip(plan.scheduled, step.tokens):
            req = self._by_seq.get(seq.seq_id)
            if token is None or req is None or not req.forks:
                continue
            forks, req.forks = req.forks, []
            if (lps := step.logprobs.get(seq.seq_id)) is not None:
                req.prompt_logprobs.update(lps.prompt)  # siblings compute only the tail: they share the rest
            for child in forks:
                if child.done:
                    continue
                self.scheduler.fork(seq, child.seq)
                child.timings.released = req.timings.released
                child.prompt_logprobs = dict(req.prompt_logprobs)

    def _check_capacity(self, num_tokens: int) -> None:
        tokens = self.queue.num_tokens + sum(len(s) for s in self.scheduler.waiting_seqs())
        self.queue.check_capacity(num_tokens, self.num_waiting, tokens, max(self.counters.step_seconds, 1e-3))

    def abort(self, request_id: str, reason: EndReason = EndReason.ABORTED) -> None:
        """Ends a request at the next step boundary (the client's cancel, or the server's shutdown)."""
        if request_id in self.requests:
            self._aborts.setdefault(request_id, reason)
            self._wake.set()

    # --- the loop -----------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock()
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
                self._end(self._by_seq[seq.seq_id], seq.finish_reason)
            if not plan.scheduled:
                await asyncio.sleep(0.001)
                continue
            t0 = self.clock()
            for seq in plan.admitted:
                req = self._by_seq[seq.seq_id]
                if req.timings.scheduled is None:  # first admission only (a preempted one is admitted again)
                    req.timings.scheduled = t0
            try:
                step = await loop.run_in_executor(self._executor, self.runner.execute, plan.scheduled)
            except Exception:  # a failed step fails its requests, not the server
                log.exception("model step failed; failing its %d sequences", len(plan.scheduled))
                for seq, _ in plan.scheduled:
                    self._end(self._by_seq[seq.seq_id], EndReason.FAILED, message="internal error during the model step")
                continue
            elapsed = self.clock() - t0
            self.counters.step(elapsed, len(plan.scheduled), plan.num_tokens)
            if self.counters.wants_records:
                self.counters.record(StepRecord(t0, elapsed, len(plan.scheduled), plan.num_tokens, self.num_waiting,
                                                len(plan.preempted), self.scheduler.num_blocks_used))
            for watch in self.counters.step_watchers:  # batcher/step_view.py: only while someone watches
                watch(self, plan, step.tokens, t0, elapsed)
            self._fork(plan, step)  # before update, which may end (and free) a sequence on its first token
            self.scheduler.update(plan, step.tokens)
            self.prefill_progress.step(plan.scheduled, step.tokens, elapsed,
                                       lambda s: self._by_seq[s.seq_id].request_id)
            self._emit(plan, step)

    def _between_steps(self, now: float) -> None:
        """Admission, aborts and deadlines: every change to who is scheduled happens here, between steps."""
        for req in self.queue.release(now):
            req.timings.released = now
            self.scheduler.add(req.seq)
        ended = bool(self._aborts)
        aborts, self._aborts = self._aborts, {}
        for rid, reason in aborts.items():
            if rid in self.requests:
                self._end(self.requests[rid], reason)
        if self.cfg.timeout_s:
            message = f"timeout: not started within {self.cfg.timeout_s:g}s (server busy)"
            for req in self._waiting():
                if req.timings.scheduled is None and req.deadline <= now:
                    self._end(req, EndReason.TIMED_OUT, message=message)
                    ended = True
        if ended:  # an ended request still in the batching window leaves it
            self.queue.remove(lambda p: p.item.done)

    def _waiting(self) -> list[Request]:
        """Accepted and not running: in the batching window, or released and not admitted yet (or preempted)."""
        return [p.item for p in self.queue.pending] + [self._by_seq[s.seq_id] for s in self.scheduler.waiting_seqs()]

    def _emit(self, plan: SchedulerOutput, step: StepOutput) -> None:
        now = self.clock()
        for (seq, _), token in zip(plan.scheduled, step.tokens):
            req = self._by_seq[seq.seq_id]
            lps = step.logprobs.get(seq.seq_id)
            if lps is not None:
                req.prompt_logprobs.update(lps.prompt)  # a recomputed (preempted) prompt writes the same values
            if token is None:
                continue
            extra = self._logprob_fields(req, lps)
            if seq.params.max_tokens == 0:  # the prompt was only scored (the scheduler ended it): no token
                extra.pop("logprobs", None)
                self._end(req, seq.finish_reason, **extra)
                continue
            t = req.timings
            t.first_token = now if t.first_token is None else t.first_token
            t.token_times.append(now)
            self.counters.generation_tokens += 1
            text = req.detok.push([token])
            if req.detok.stopped and not seq.is_finished:
                self._end(req, EndReason.STOPPED, text, [token], **extra)
            elif seq.is_finished:  # (a response_format failure's message replaces the text)
                self._end(req, seq.finish_reason, text, [token], message=seq.failure, **extra)
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

    def _end(self, req: Request, reason: EndReason, text: str = "", token_ids: list[int] | None = None,
             logprobs: list[TokenLogprob] | None = None, prompt_logprobs: list[TokenLogprob | None] | None = None,
             message: str | None = None) -> None:
        """The one way a request ends: its sequence leaves the scheduler (its blocks freed), its final output
        says why, and siblings that never forked from it end with it. A failure's message replaces the text."""
        if req.done:
            return
        req.done = True
        seq = req.seq
        if not seq.is_finished:  # ended from outside its own rules (stop string, abort, deadline, failure)
            self.scheduler.finish(seq, reason)
        req.timings.finished = self.clock()
        self.counters.ended(reason, 0 if req.forked else seq.num_prompt_tokens)
        text = message if message is not None else text + req.detok.flush()
        req.outputs.put_nowait(RequestOutput(req.request_id, text, token_ids or [], reason, seq.num_prompt_tokens,
                                             seq.num_output_tokens, req.timings, logprobs, prompt_logprobs))
        self._forget(req)
        forks, req.forks = req.forks, []
        for sibling in forks:  # ended before its prompt was computed: so do the others
            self._end(sibling, reason if reason.error else EndReason.ABORTED, message=message)
        if self.log_requests:
            log.info("request %s ended (%s): %r", req.request_id, reason.value, req.detok.text)

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self._by_seq.pop(req.seq.seq_id, None)

    # --- statistics ---------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests accepted and not running (throttled, in the window, released and not admitted, preempted):
        the one count that admission bounds and statistics report."""
        return self.queue.num_waiting + self.scheduler.num_waiting

    def stats(self) -> EngineStats:
        c, sched = self.counters, self.scheduler
        s, bs = sched.stats, sched.block_size
        return EngineStats(
            waiting=self.num_waiting, running=len(sched.running), preemptions=s.preemptions,
            kv_blocks_used=sched.num_blocks_used, kv_blocks_total=sched.num_blocks,
            prefix_cache_queries=s.prefix_queries * bs, prefix_cache_hits=s.prefix_hits * bs,
            steps=c.steps, mean_batch_size=c.mean_batch_size, last_batch_size=c.last_batch_size,
            last_step_tokens=c.last_step_tokens, prompt_tokens=c.prompt_tokens,
            generation_tokens=c.generation_tokens, finished_by_reason=dict(c.finished_by_reason))

    def step_hub(self, max_viewers: int, buffer_events: int) -> StepHub:
        """Live viewers of this engine's steps (the dashboard): it is watched only while one is attached."""
        return StepHub(self, max_viewers, buffer_events)

    # --- for replicas/: what one replica reports to the router in front of it (the only such method) --------

    def replica_snapshot(self) -> dict:
        """stats() and the hash of every full block a prefix lookup can find now (held or in the free list)."""
        return {"stats": self.stats(), "cached_block_hashes": self.scheduler.cached_block_hashes()}

    def config_info(self) -> dict[str, dict[str, str]]:
        """The cache's and the engine's configuration as label values (/metrics' *_config_info series)."""
        r, c = self.runner, self.cfg
        return {"cache": {"block_size": str(self.scheduler.block_size), "num_blocks": str(self.scheduler.num_blocks),
                          "cache_dtype": dtype_name(r.kv_dtype), "kv_cache_bytes": str(r.kv_cache_bytes),
                          "enable_prefix_caching": str(c.enable_prefix_caching).lower()},
                "engine": {"policy": c.policy, "max_num_seqs": str(c.max_num_seqs),
                           "max_num_batched_tokens": str(c.max_num_batched_tokens),
                           "max_batch_size": str(c.max_batch_size), "max_wait_ms": f"{c.max_wait_ms:g}",
                           "max_model_len": str(r.max_model_len), "dtype": dtype_name(r.dtype),
                           "quantization": r.cfg.quantization,
                           "quant_dense_rows": str(r.quant_dense_rows or "off"),
                           "quant_dense_weights": r.cfg.quant_dense_weights,
                           "device": r.device, "threads": str(r.threads)}}
