"""JitneyRouter: a Ray Serve RequestRouter that feeds policy.py what the replicas report.

Ray Serve runs it in the process that holds the deployment handle (our HTTP front end), for every request, with
the replicas that can take it. It knows, for each replica:
  - the hashes of the KV blocks the replica holds, as the replica last reported them (record_routing_stats,
    every `stats_period_s`), plus the block hashes of the prompts routed to it since (for `recent_ttl_s`: a
    prefix sent a moment ago is on its way into that cache, even if no report says so yet);
  - its load: Ray's own count of requests in flight there (updated as each request is sent and ends), or the
    replica's reported queued + running when Ray has no fresh count.
The prompt's block hashes are computed here with batcher's function (model_runner.kv_cache), so a match is a
match of exact token blocks, never of text.
"""
from __future__ import annotations

import random
import time

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from batcher.kv_cache_manager import prefix_block_hashes

from . import board
from .policy import DEFAULT_IMBALANCE, Candidate, decide, leading_matches


class _Held:
    """Membership in what a replica reported plus what was routed to it lately."""

    def __init__(self, reported: set[int], recent: dict[int, float], now: float):
        self.reported, self.recent, self.now = reported, recent, now

    def __contains__(self, h: int) -> bool:
        return h in self.reported or self.recent.get(h, 0.0) > self.now


class JitneyRouter(RequestRouter):
    """No FIFO mixin: with it, Ray hands the replica chosen for one request to the oldest waiting request,
    which may have another prefix; without it, each choice serves the request it was made for."""

    def initialize_state(self, policy: str = "prefix", imbalance: float = DEFAULT_IMBALANCE,
                         recent_ttl_s: float = 5.0, **kwargs) -> None:
        if kwargs:
            raise TypeError(f"JitneyRouter: unknown arguments {sorted(kwargs)}")
        self.policy, self.imbalance, self.recent_ttl_s = policy, imbalance, recent_ttl_s
        self.recent: dict[ReplicaID, dict[int, float]] = {}
        self._reported: dict[ReplicaID, tuple[int, set[int]]] = {}  # (id of the report's list, as a set)
        self.rng, self.turn = random.Random(), 0
        board.ROUTERS.add(self)

    def _load(self, r: RunningReplica) -> int:
        n = self.replica_queue_len_cache.get(r.replica_id)
        return n if n is not None else int((r.routing_stats or {}).get("load", 0))

    def _reported_hashes(self, r: RunningReplica) -> set[int]:
        listed = (r.routing_stats or {}).get("cached_block_hashes") or []
        seen = self._reported.get(r.replica_id)
        if seen is None or seen[0] != id(listed):  # a new report: convert it once
            seen = (id(listed), set(listed))
            self._reported[r.replica_id] = seen
        return seen[1]

    def _prompt_hashes(self, pending: PendingRequest | None, replicas: list[RunningReplica]) -> list[int]:
        if self.policy != "prefix" or pending is None or not pending.args:
            return []
        block_size = next((r.routing_stats["block_size"] for r in replicas if r.routing_stats), None)
        return prefix_block_hashes(pending.args[0], block_size) if block_size else []

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: wait a little before asking again
        if not candidate_replicas:
            return []
        now = time.monotonic()
        hashes = self._prompt_hashes(pending_request, candidate_replicas)
        by_key, cands = {}, []
        for r in candidate_replicas:
            key = r.replica_id.unique_id
            by_key[key] = r
            matched = leading_matches(hashes, _Held(self._reported_hashes(r), self.recent.get(r.replica_id, {}),
                                                    now)) if hashes else 0
            cands.append(Candidate(key, self._load(r), float((r.routing_stats or {}).get("kv_usage", 0.0)), matched))
        d = decide(self.policy, cands, self.imbalance, self.rng, self.turn)
        self.turn += 1
        first = by_key[d.order[0]]
        if hashes:
            recent = self.recent.setdefault(first.replica_id, {})
            for h in hashes:
                recent[h] = now + self.recent_ttl_s
            if self.turn % 256 == 0:  # forget what has expired
                for rid in list(self.recent):
                    self.recent[rid] = {h: t for h, t in self.recent[rid].items() if t > now}
        board.DECISIONS[(self.policy, d.kind)] += 1
        if d.matched_blocks and hashes:
            board.PREFIX_HIT_TOKENS["tokens"] += d.matched_blocks * first.routing_stats["block_size"]
        return [[by_key[k]] for k in d.order]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.recent.pop(replica_id, None)
        self._reported.pop(replica_id, None)
