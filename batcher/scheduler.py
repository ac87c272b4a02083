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

from model_runner.sequence import EndReason, Sequence

from .config import BatcherConfig, Policy
from .kv_cache_manager import KVCacheManager


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens it feeds)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended while scheduling (outgrew the whole cache)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __repr__(self) -> str:
        """e.g. SchedulerOutput(13 tokens: #3+1, #4+12 new; preempted #5): sequence #4 admitted with a 12-token chunk."""
        new = {id(s) for s in self.admitted}
        steps = ", ".join(f"#{s.seq_id}+{n}{' new' if id(s) in new else ''}" for s, n in self.scheduled)
        ended = "".join(f"; {label} " + " ".join(f"#{s.seq_id}" for s in seqs)
                        for label, seqs in (("preempted", self.preempted), ("finished", self.finished)) if seqs)
        return f"SchedulerOutput({self.num_tokens} tokens: {steps or 'nothing'}{ended})"


@dataclass
class SchedulerStats:
    preemptions: int = 0
    prefix_queries: int = 0      # prompt blocks looked up in the prefix cache
    prefix_hits: int = 0         # ... and found there


class Scheduler:
    def __init__(self, cfg: BatcherConfig, num_blocks: int, block_size: int, eos_token_ids: tuple[int, ...],
                 max_model_len: int):
        if cfg.max_num_batched_tokens is None:
            raise ValueError("the step budget is unset: BatcherConfig.for_runner(runner) fills in the runner's")
        self.cfg = cfg
        # The scheduler's own block manager (as in nano-vllm and vLLM v1): nobody else allocates, frees or forks
        # blocks, so what it records is what the runner's cache holds. The engine asks through the methods below.
        self.kv = KVCacheManager(num_blocks, block_size, cfg.enable_prefix_caching)
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
        (self.waiting if self.cfg.policy is Policy.CONTINUOUS else self.batch).appendleft(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A parallel sample (n > 1) starts from parent, whose prompt's K/V are all written: it shares the prompt's
        full blocks by reference, as a prefix-cache hit would, and is scheduled next. The last prompt token is always
        computed by each sample itself: its logits are that sample's first draw."""
        shared = (parent.num_prompt_tokens - 1) // self.kv.block_size
        self.kv.fork(parent, child, shared)
        child.num_computed_tokens = shared * self.kv.block_size
        self.add_forked(child)

    def check_fits(self, num_prompt_tokens: int) -> None:
        self.kv.check_fits(num_prompt_tokens)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.batch)

    @property
    def num_waiting(self) -> int:
        """Sequences here and not running: not admitted yet, or preempted."""
        return len(self.waiting) + len(self.batch)

    def waiting_seqs(self) -> list[Sequence]:
        return [*self.waiting, *self.batch]

    def finish(self, seq: Sequence, reason: EndReason) -> None:
        """Ends a sequence wherever it is (running, waiting, or in a batch) and frees its blocks now."""
        seq.finish_reason = seq.finish_reason or reason
        for group in (self.running, self.waiting, self.batch):
            if seq in group:
                group.remove(seq)
        self.kv.free(seq)

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
        self._check(out)
        return out

    def _check(self, out: SchedulerOutput) -> None:
        """The plan's invariants: within both budgets, each sequence once, each holding the blocks its step
        writes (the runner indexes block tables by position, unchecked)."""
        limit = self.cfg.max_num_seqs if self.cfg.policy is Policy.CONTINUOUS else self.cfg.max_batch_size
        assert out.num_tokens <= self.cfg.max_num_batched_tokens, out
        running = {id(s) for s in self.running}
        assert len(running) <= limit and all(id(s) in running for s, _ in out.scheduled), out
        assert len({id(s) for s, _ in out.scheduled}) == len(out.scheduled), out
        bs = self.kv.block_size
        for s, n in out.scheduled:
            assert n > 0 and len(s.block_table) * bs >= s.num_computed_tokens + n, (s, n)

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Grows seq's block table, preempting the newest running sequences until it fits (or seq itself goes)."""
        while not self.kv.allocate_slots(seq, num_tokens - seq.num_computed_tokens):
            if self.running == [seq]:  # alone and still too big: it can never fit, so it ends here
                self.finish(seq, EndReason.LENGTH)
                out.finished.append(seq)
                return False
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)  # never one already in out.scheduled: that holds only older sequences
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV, keep the tokens; it will prefill prompt + output again."""
        assert seq not in self.running and seq.block_table and not seq.is_finished, f"cannot preempt {seq!r}"
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        # It stays a member of its batch under the run-to-completion policies.
        (self.waiting if self.cfg.policy is Policy.CONTINUOUS else self.batch).appendleft(seq)
        self.stats.preemptions += 1

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        if self.cfg.policy is Policy.CONTINUOUS:
            source, limit = self.waiting, self.cfg.max_num_seqs
        else:  # run-to-completion policies: a new batch forms only when the last one has fully left
            if not self.running and not self.batch:
                size = 1 if self.cfg.policy is Policy.SEQUENTIAL else self.cfg.max_batch_size
                while self.waiting and len(self.batch) < size:
                    self.batch.append(self.waiting.popleft())
            source, limit = self.batch, self.cfg.max_batch_size
        while source and budget > 0 and len(self.running) < limit:
            seq = source[0]
            if seq.block_table:  # a parallel sample: it holds its shared prompt blocks already
                hit, start = None, seq.num_computed_tokens
            else:
                hit = self.kv.find_computed_blocks(seq)
                start = len(hit) * self.kv.block_size
                self.stats.prefix_queries += hit.num_queried
                self.stats.prefix_hits += len(hit)
            n = min(len(seq) - start, budget)
            if not self.kv.allocate_slots(seq, n, hit):
                break  # first come, first served: nobody overtakes the head of the line
            source.popleft()
            seq.num_computed_tokens = seq.num_cached_tokens = start
            self.running.append(seq)
            out.admitted.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

    # --- the KV cache, as the engine reports it ------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_blocks_used(self) -> int:
        return self.kv.num_used

    def cached_block_hashes(self) -> list[int]:
        """Every full block a prefix lookup can find now (held or on the free list): what a replica tells the
        router."""
        return list(self.kv.cached)

    # --- applying a step's results ------------------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: list[int | None]) -> None:
        """Advances each scheduled sequence; one that finished leaves the scheduler here, its blocks freed (the
        engine sees it as seq.is_finished when it hands out the step's tokens)."""
        for (seq, n), token in zip(out.scheduled, sampled):
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq)
            if token is None:
                continue
            if seq.params.max_tokens == 0:  # the prompt was only to be scored: its logprobs are out, stop here
                seq.finish_reason = EndReason.LENGTH
            else:
                seq.append_token(token, self.eos_token_ids, self.max_model_len)
            if seq.is_finished:
                self.finish(seq, seq.finish_reason)
