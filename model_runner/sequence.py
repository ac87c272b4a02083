"""A Sequence: one request's tokens and its place in the KV cache, the unit the runner and scheduler share."""
from __future__ import annotations

import itertools
from enum import Enum

import torch

from .grammar import one_line
from .sampler import make_generator
from .sampling_params import SamplingParams

_ids = itertools.count()


class EndReason(str, Enum):
    """Why a request ended: the one end-reason type. A sequence's own rules set FINISHED, LENGTH or INVALID_OUTPUT
    (append_token, the scheduler); the engine sets the rest when it ends a request from outside (batcher/engine.py
    _end). Every path that ends one names one of these, and nothing else."""
    FINISHED = "finished"      # an end-of-sequence token or a stop token id
    STOPPED = "stopped"        # a stop string
    LENGTH = "length"          # max_tokens, the context window, or a sequence bigger than the whole KV cache
    ABORTED = "aborted"        # the client cancelled or went away
    TIMED_OUT = "timed_out"    # not started within timeout_s
    SHUT_DOWN = "shut_down"    # the server stopped before it ended
    FAILED = "failed"          # the model step raised
    UNAVAILABLE = "unavailable"  # the replica serving it died or could not be reached (replicas/)
    # response_format: the matcher failed (a limit, a rejected token) or the finished document does not match the
    # schema; Sequence.failure says which. An error, never a "stop".
    INVALID_OUTPUT = "invalid_output"

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish_reason: stop | length | abort."""
        return _FINISH_REASONS.get(self.value, "abort")

    @property
    def error(self) -> str | None:
        """The error kind a client is told of (the API maps it to a status), None for an ordinary end."""
        return _ERROR_KINDS.get(self.value)


_FINISH_REASONS = {"finished": "stop", "stopped": "stop", "length": "length"}  # the rest: "abort"
_ERROR_KINDS = {"timed_out": "timeout", "shut_down": "shutdown", "failed": "internal", "unavailable": "unavailable",
                "invalid_output": "invalid_output"}


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, seq_id: int | None = None):
        self.seq_id = next(_ids) if seq_id is None else seq_id
        self.token_ids = list(prompt_token_ids)   # prompt, then every generated token
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0              # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.params = params
        self.generator: torch.Generator | None = make_generator(params.seed, "cpu")
        # Its own grammar matcher (response_format), advanced by every token appended (model_runner/grammar.py).
        self.matcher = params.grammar.matcher() if params.grammar is not None else None
        self.finish_reason: EndReason | None = None
        self.failure: str | None = None           # why it ended with EndReason.INVALID_OUTPUT, one line for the client
        self.num_cached_tokens = 0                # prompt tokens the prefix cache held when it was admitted

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        end = f", {self.finish_reason.value}" if self.finish_reason else ""
        return (f"Sequence(#{self.seq_id}: {self.num_prompt_tokens} prompt + {self.num_output_tokens} output tokens, "
                f"{self.num_computed_tokens} computed, blocks {self.block_table}{end})")

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def append_token(self, token_id: int, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        """Adds a sampled token and decides whether the sequence ends with it (token-level stop rules)."""
        self.token_ids.append(token_id)
        if self.matcher is not None and (why := self._grammar_failure(token_id, eos_token_ids)):
            self.finish_reason = EndReason.INVALID_OUTPUT
            self.failure = (f"the output is not a document matching response_format's schema ({why[:300]}), so it "
                            "is not returned: simplify the schema (fewer alternatives, smaller bounds) or retry")
            return
        p, n = self.params, self.num_output_tokens
        if n >= p.min_tokens and (token_id in p.stop_token_ids or (not p.ignore_eos and token_id in eos_token_ids)):
            self.finish_reason = EndReason.FINISHED
        elif n >= p.max_tokens or len(self.token_ids) >= max_model_len:
            self.finish_reason = EndReason.LENGTH

    def _grammar_failure(self, token_id: int, eos_token_ids: tuple[int, ...]) -> str | None:
        """Advances the matcher; why the output cannot end as a matching document, or None.

        A matcher that hit one of llguidance's limits (or took a token its mask forbade) is in an error state and
        from then on allows only end-of-sequence: without this check that end would read as a finished document.
        An end-of-sequence token ends the document the grammar accepted; the schema itself then checks it, for
        the bounds llguidance's grammar only approximates (model_runner/grammar.py, Grammar.check)."""
        m = self.matcher
        if not m.consume_token(token_id) or m.is_error():
            return f"the grammar engine stopped: {one_line(m.get_error())}"
        if token_id in eos_token_ids:  # (the mask allows it only once the document is complete)
            return self.params.grammar.check(self.output_token_ids[:-1])
        return None
