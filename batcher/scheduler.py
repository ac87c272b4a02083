"""The scheduler: which sequences run in the next model step, and how many tokens each feeds.

One step builder serves all four policies; a policy only decides who may be admitted:
  sequential  one sequence at a time, to completion
  static      a batch of up to max_batch_size (formed from what the queue released), run to completion
  dynamic     the same, but the queue releases whatever arrived inside the window
  continuous  admit at every step while the budgets allow; each sequence leaves the step it ends
Every step honours three budgets: sequences (max_num_seqs), tokens (max_num_batched_tokens: prompts are
prefilled in chunks, mixed with running decodes) and free KV blocks. When blocks run out, the most recently
admitted running sequence is preempted: its blocks are freed, and it is requeued at the front to be
recomputed later. A step that preempted admits nobody new.

schedule() returns a plain SchedulerOutput and update() applies the sampled tokens: no model in here.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from model_runner.kv_cache import BlockAllocator, block_hash
from model_runner.sequence import FinishReason, Sequence

from .config import BatcherConfig


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens it feeds)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended while scheduling (outgrew the whole cache)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


@dataclass
class SchedulerStats:
    preemptions: int = 0
    prefix_queries: int = 0      # prompt blocks looked up in the prefix cache
    prefix_hits: int = 0         # ... and found there
    chunked_prefills: int = 0    # steps in which a prompt was fed only partly


class Scheduler:
    def __init__(self, cfg: BatcherConfig, allocator: BlockAllocator, eos_token_ids: tuple[int, ...],
                 max_model_len: int):
        self.cfg = cfg.validate()
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # in admission order: the last is the first to be preempted
        self.batch: deque[Sequence] = deque()  # static/dynamic/sequential: members of the batch not yet admitted
        self.stats = SchedulerStats()

    # --- membership ---------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_forked(self, seq: Sequence) -> None:
        """A parallel sample that already holds its shared prompt blocks: first in line (it holds memory), and
        under the run-to-completion policies a member of the running batch."""
        (self.waiting if self.cfg.policy == "continuous" else self.batch).appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.batch)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends a sequence wherever it is (running, waiting, or in a batch) and frees its blocks now."""
        seq.finish_reason = seq.finish_reason or reason
        for group in (self.running, self.waiting, self.batch):
            if seq in group:
                group.remove(seq)
        self.allocator.free(seq.block_table)

    # --- one step -----------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        # Running sequences first, oldest first: they hold memory, and finishing them frees it.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this loop to make room for an older one
                continue
            n = min(len(seq) - seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n, out):
                continue
            out.scheduled.append((seq, n))
            budget -= n
        if not out.preempted:
            self._admit(out, budget)
        self.stats.chunked_prefills += any(
            s.num_computed_tokens + n < len(s) for s, n in out.scheduled)
        return out

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Grows seq's block table, preempting the newest running sequences until it fits (or seq itself goes)."""
        while not self.allocator.grow(seq.block_table, num_tokens):
            if self.running == [seq]:  # alone and still too big: it can never fit, so it ends here
                self.finish(seq, FinishReason.LENGTH)
                out.finished.append(seq)
                return False
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            out.scheduled = [(s, n) for s, n in out.scheduled if s is not victim]
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV, keep the tokens; it will prefill prompt + output again."""
        self.allocator.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.block_hashes.clear()
        # It stays a member of its batch under the run-to-completion policies.
        (self.waiting if self.cfg.policy == "continuous" else self.batch).appendleft(seq)
        self.stats.preemptions += 1

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        if self.cfg.policy == "continuous":
            source, limit = self.waiting, self.cfg.max_num_seqs
        else:  # run-to-completion policies: a new batch forms only when the last one has fully left
            if not self.running and not self.batch:
                size = 1 if self.cfg.policy == "sequential" else self.cfg.max_batch_size
                while self.waiting and len(self.batch) < size:
                    self.batch.append(self.waiting.popleft())
            source, limit = self.batch, self.cfg.max_batch_size
        while source and budget > 0 and len(self.running) < limit:
            seq = source[0]
            forked = bool(seq.block_table)  # a parallel sample: it holds its shared prompt blocks already
            hits = [] if forked else self._prefix_hits(seq)
            cached = seq.block_table if forked else [b for b, _ in hits]
            start = seq.num_computed_tokens if forked else len(cached) * self.block_size
            n = min(len(seq) - start, budget)
            revived = sum(self.allocator.ref_counts[b] == 0 for b in cached)  # hits that sit in the free list
            if self.allocator.blocks_needed(cached, start + n) > self.allocator.num_free - revived:
                break  # first come, first served: nobody overtakes the head of the line
            source.popleft()
            if not forked:
                for b in cached:
                    self.allocator.share(b)
                seq.block_table = cached
                seq.block_hashes = [h for _, h in hits]
                seq.num_computed_tokens = start
            seq.num_cached_tokens = start
            self.allocator.grow(seq.block_table, start + n)
            self.running.append(seq)
            out.admitted.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

    def _prefix_hits(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block, hash) of cached blocks holding seq's leading full blocks; at least one token is left to compute."""
        # A request for prompt logprobs needs every prompt position's logits: its prompt is computed, not reused.
        if not self.allocator.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        bs, hits, parent = self.block_size, [], None
        num_full = (len(seq) - 1) // bs  # the last token is always computed: its logits are needed
        self.stats.prefix_queries += num_full
        for i in range(num_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = block_hash(parent, tokens)
            b = self.allocator.lookup(parent, tokens)
            if b is None:
                break
            hits.append((b, parent))
        self.stats.prefix_hits += len(hits)
        return hits

    # --- applying a step's results ------------------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: list[int | None]) -> list[Sequence]:
        """Advances each scheduled sequence; returns the ones that finished (their blocks already freed)."""
        finished = list(out.finished)
        for (seq, n), token in zip(out.scheduled, sampled):
            seq.num_computed_tokens += n
            self._register_full_blocks(seq)
            if token is None:
                continue
            if seq.params.max_tokens == 0:  # the prompt was only to be scored: its logprobs are out, stop here
                seq.finish_reason = FinishReason.LENGTH
            else:
                seq.append_token(token, self.eos_token_ids, self.max_model_len)
            if seq.is_finished:
                self.finish(seq, seq.finish_reason)
                finished.append(seq)
        return finished

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Blocks whose K/V are now complete become findable by later requests with the same prefix."""
        if not self.allocator.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            self.allocator.register(seq.block_table[i], h, tokens)
