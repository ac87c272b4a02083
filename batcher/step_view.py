"""Step summaries for the dashboard (GET /dashboard, GET /v1/engine/steps) and for recordings (bench --record-steps).

A summary is built only while someone watches: StepHub and StepRecorder put one function on the engine's
Counters.step_watchers when their first viewer (or the recording) starts, and take it off when the last one
leaves, so an engine nobody watches does no extra work at all (the loop iterates an empty list).

Privacy: a summary carries counts, sequence ids (small integers the engine assigns), times and block ids, never
a token id, a prompt or an output text, nor the client's request id. The server logs no prompts, and the
dashboard must not be a way around that (tests/test_dashboard_stream.py checks it).

Event schema (one JSON object each; docs/serving.md#dashboard):
  hello  {type, v, t, policy, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_batch_size,
          max_wait_ms, prefix_caching, label?}
  step   {type, t, n, ms, seqs: [[seq id, tokens, "p"|"d"], ...], prefill, decode, sampled, admitted: [[id, cached
          prefix blocks], ...], preempted: [ids], held, ttft_ms: [...], itl_ms: [...], ...queue, kv}
  state  {type, t, ...queue, kv}    (between steps: at connect, and every second while idle)
  queue: window (requests in the batching window), window_ids, window_ms (until the window closes, or null),
         waiting (in the scheduler, not running: not admitted yet, or preempted), waiting_ids, running, running_ids
  kv:    {total, used, free, evictable, shared, tables: {seq id: [[first block, count], ...]}, evictable_runs}
         used = blocks some sequence holds (= /metrics' jitney_kv_cache_blocks_used); evictable = free blocks that
         still hold a cached prefix (a later request may take them back); free = the rest; shared = blocks held
         by more than one sequence (a common prefix, parallel samples).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, deque
from typing import IO

from .config import Policy

log = logging.getLogger("jitney.step_view")
SCHEMA_VERSION = 1
MAX_IDS = 64  # ids listed per queue (counts are always whole)


def runs(ids) -> list[list[int]]:
    """[[start, count], ...] of a list of block ids, in order (a block table is mostly consecutive)."""
    out: list[list[int]] = []
    for b in ids:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return out


def kv_map(engine) -> dict:
    sched = engine.scheduler
    kv = sched.kv  # read only: the scheduler owns its KV manager
    tables, held = {}, Counter()
    for seq in (*sched.running, *sched.waiting, *sched.batch):
        if seq.block_table:
            tables[str(seq.seq_id)] = runs(seq.block_table)
            held.update(seq.block_table)
    ref = kv.ref_counts
    evictable = sorted(b for b in kv.block_key if ref[b] == 0)
    return {"total": kv.num_blocks, "used": kv.num_used, "free": kv.num_free - len(evictable),
            "evictable": len(evictable), "shared": sum(1 for n in held.values() if n > 1),
            "tables": tables, "evictable_runs": runs(evictable)}


def queue_view(engine, now: float) -> dict:
    q, sched = engine.queue, engine.scheduler
    nxt = q.next_event()
    waiting = sched.waiting_seqs()
    return {"window": q.num_waiting, "window_ids": [p.item.seq.seq_id for p in list(q.pending)[:MAX_IDS]],
            "window_ms": None if nxt is None else round(max(nxt - now, 0.0) * 1000, 1),
            "waiting": len(waiting), "waiting_ids": [s.seq_id for s in waiting[:MAX_IDS]],
            "running": len(sched.running), "running_ids": [s.seq_id for s in sched.running[:MAX_IDS]]}


def hello(engine, t: float, label: str | None = None) -> dict:
    c = engine.cfg
    out = {"type": "hello", "v": SCHEMA_VERSION, "t": round(t, 6), "policy": c.policy,
           "num_blocks": engine.scheduler.num_blocks, "block_size": engine.scheduler.block_size, "max_num_seqs": c.max_num_seqs,
           "max_num_batched_tokens": c.max_num_batched_tokens, "max_batch_size": c.max_batch_size,
           "max_wait_ms": c.max_wait_ms, "prefix_caching": c.enable_prefix_caching}
    if label is not None:
        out["label"] = label
    return out


def state(engine, t: float) -> dict:
    return {"type": "state", "t": round(t, 6), **queue_view(engine, engine.clock()), "kv": kv_map(engine)}


def _held(engine, plan) -> str | None:
    """Why the head of the waiting line was not admitted at this step (None: nobody waits)."""
    sched, c = engine.scheduler, engine.cfg
    if not (sched.waiting or sched.batch):
        return None
    if plan.preempted:
        return "preemption: a step that preempts admits nobody"
    if c.policy is not Policy.CONTINUOUS:
        return "batch running: a new batch forms when this one has left" if sched.running else "kv_blocks"
    if len(sched.running) >= c.max_num_seqs:
        return "max_num_seqs"
    if plan.num_tokens >= c.max_num_batched_tokens:
        return "max_num_batched_tokens"
    return "kv_blocks"


def summarize_step(engine, plan, sampled, t0: float, seconds: float, n: int, origin: float = 0.0) -> dict:
    """The step just run (before its tokens are applied): who ran, how many tokens of which kind, the queue and
    the KV cache as they stood, and the latencies of the tokens it sampled."""
    now = t0 + seconds
    seqs, prefill, decode, ttft, itl = [], 0, 0, [], []
    by_seq = engine._by_seq
    for (seq, k), token in zip(plan.scheduled, sampled):
        is_decode = k == 1 and seq.num_output_tokens > 0 and seq.num_computed_tokens == len(seq) - 1
        seqs.append([seq.seq_id, k, "d" if is_decode else "p"])
        if is_decode:
            decode += k
        else:
            prefill += k
        req = by_seq.get(seq.seq_id)
        if token is None or req is None:
            continue
        t = req.timings
        if t.first_token is None:
            ttft.append(round((now - t.arrival) * 1000, 2))
        elif t.token_times:
            itl.append(round((now - t.token_times[-1]) * 1000, 2))
    bs = engine.scheduler.block_size
    return {"type": "step", "t": round(t0 - origin, 6), "n": n, "ms": round(seconds * 1000, 3), "seqs": seqs,
            "prefill": prefill, "decode": decode, "sampled": sum(tok is not None for tok in sampled),
            "admitted": [[s.seq_id, s.num_cached_tokens // bs] for s in plan.admitted],
            "preempted": [s.seq_id for s in plan.preempted], "held": _held(engine, plan),
            "ttft_ms": ttft, "itl_ms": itl, **queue_view(engine, t0), "kv": kv_map(engine)}


def encode(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"))


class _Watch:
    """One watcher on one engine's step_watchers: builds each summary once, hands the JSON to `sink`. Detaches
    itself (and logs why) if building a summary ever raises: a dashboard must never fail a model step."""

    def __init__(self, engine, sink, origin: float = 0.0):
        self.engine, self.sink, self.origin, self.n = engine, sink, origin, 0

    def __call__(self, engine, plan, sampled, t0, seconds) -> None:
        self.n += 1
        try:
            self.sink(encode(summarize_step(engine, plan, sampled, t0, seconds, self.n, self.origin)))
        except Exception:
            log.exception("step summary failed: the dashboard stops watching this engine")
            self.detach()

    def attach(self) -> None:
        if self not in self.engine.counters.step_watchers:
            self.engine.counters.step_watchers.append(self)

    def detach(self) -> None:
        if self in self.engine.counters.step_watchers:
            self.engine.counters.step_watchers.remove(self)


class Viewer:
    """One dashboard connection's buffer: at most `limit` events. A viewer that lets it fill (it reads slower
    than steps come) is dropped: its buffer is emptied and it gets nothing more; nothing grows without bound."""

    def __init__(self, hub: "StepHub", limit: int):
        self.hub, self.limit = hub, limit
        self.events: deque[str] = deque()
        self.dropped = False
        self.ready = asyncio.Event()  # events are waiting (or the viewer was dropped)
        self.gone = asyncio.Event()   # dropped

    def push(self, line: str) -> None:
        if self.dropped:
            return
        if len(self.events) >= self.limit:
            self.drop()
            return
        self.events.append(line)
        self.ready.set()

    def drop(self) -> None:
        if not self.dropped:
            log.warning("dashboard viewer dropped: it fell %d step events behind", self.limit)
        self.dropped = True
        self.events.clear()
        self.ready.set()
        self.gone.set()
        self.hub.leave(self)

    async def take(self, timeout: float) -> list[str]:
        """Every event buffered now (waiting up to timeout for one); [] on timeout or once dropped."""
        if not self.events and not self.dropped:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except TimeoutError:
                pass
        out = list(self.events)
        self.events.clear()
        return out


class TooManyViewers(Exception):
    pass


class StepHub:
    """The live viewers of one engine. The engine is watched only while at least one viewer is attached."""

    def __init__(self, engine, max_viewers: int = 4, buffer_events: int = 1024):
        self.engine, self.max_viewers, self.buffer_events = engine, max_viewers, buffer_events
        self.viewers: list[Viewer] = []
        self._watch = _Watch(engine, self._broadcast)

    def join(self) -> Viewer:
        if len(self.viewers) >= self.max_viewers:
            raise TooManyViewers(f"{len(self.viewers)} dashboard viewers are attached, the most allowed; "
                                 "close one and retry")
        v = Viewer(self, self.buffer_events)
        self.viewers.append(v)
        self._watch.attach()
        return v

    def leave(self, viewer: Viewer) -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)
        if not self.viewers:
            self._watch.detach()

    @property
    def live(self) -> bool:
        """The engine still accepts requests (a drain ends every viewer's stream rather than waits on it)."""
        return self.engine.accepting

    def opening(self) -> list[str]:
        """A new viewer's first events: hello, then the queue and KV cache as they are now."""
        now = self.engine.clock()
        return [encode(hello(self.engine, now)), encode(state(self.engine, now))]

    def state_now(self) -> str:
        """The state event as it is now (between steps, while no step comes)."""
        return encode(state(self.engine, self.engine.clock()))

    def _broadcast(self, line: str) -> None:
        for v in list(self.viewers):
            v.push(line)


class StepRecorder:
    """Writes the step stream of one engine run to a JSONL file (jitney bench --record-steps): a hello line
    with the run's label, then a step line per model step, times in seconds from the run's start."""

    def __init__(self, file: IO[str]):
        self.file = file
        self._watch: _Watch | None = None

    def attach(self, engine, label: str, origin: float | None = None) -> None:
        origin = engine.clock() if origin is None else origin
        self.file.write(encode(hello(engine, 0.0, label)) + "\n")
        self._watch = _Watch(engine, lambda line: self.file.write(line + "\n"), origin)
        self._watch.attach()

    def detach(self) -> None:
        if self._watch is not None:
            self._watch.detach()
            e = self._watch.engine
            self.file.write(encode(state(e, e.clock() - self._watch.origin)) + "\n")
            self.file.flush()
            self._watch = None
