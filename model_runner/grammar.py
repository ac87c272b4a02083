"""Constrained decoding: a JSON schema turned into a token mask at every step, by llguidance (the grammar engine
behind vLLM's "guidance" backend and llama.cpp's; why this one: docs/constrained-decoding.md).

Three pieces, one owner each:
  GrammarCompiler      one per runner: schema -> Grammar, validated and cached. Compiling is a few ms for a
                       typical schema; the API runs it in a worker thread, never on the event loop.
  Grammar              a compiled schema: a warmed template matcher that every sequence copies (one matcher per
                       sample, so n > 1 samples each follow the grammar on their own).
  apply_grammar_masks  in the step, just before sampling: each row with a matcher gets its allowed-token bitmask
                       and every other logit of that row is set to -inf; rows without one are not touched.
The matcher advances in Sequence.append_token, on every token the sequence takes (model_runner/sequence.py).
When the document is complete the matcher allows only end-of-sequence tokens, so the sequence stops there.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch

from .errors import InvalidRequestError

CACHE_SIZE = 64  # compiled schemas kept (clients tend to send the same few schemas again and again)


class GrammarError(InvalidRequestError):
    """A schema llguidance cannot enforce (malformed, or a keyword it does not implement)."""


class Grammar:
    """A compiled schema. matcher() gives a fresh matcher at its start: a copy of the template, which shares
    the lexer states the template built while it was warmed (a copy is cheap: no compiling)."""

    def __init__(self, template: llguidance.LLMatcher, source: str):
        self._template, self.source = template, source

    def matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()

    def __repr__(self) -> str:
        return f"Grammar({self.source[:60]!r}{'...' if len(self.source) > 60 else ''})"


class GrammarCompiler:
    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._hf, self._eos = hf_tokenizer, list(eos_token_ids)
        # The mask covers every logit and every tokenizer id, whichever is the larger.
        self._vocab = max(vocab_size, len(hf_tokenizer))
        self.mask_words = -(-self._vocab // 32)  # int32 words of one row's bitmask
        self._tokenizer: llguidance.LLTokenizer | None = None
        # The API compiles in worker threads and looks the cache up on the event loop: the cache's lock is held only
        # for a dict operation; building the tokenizer (long) has a lock of its own, so no look-up waits for it.
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()

    def prepare(self) -> None:
        """Builds llguidance's view of the vocabulary now (0.3-0.9 s measured for 49k tokens). It holds the GIL
        most of that time, which would stall the event loop if the first request paid for it: the server calls
        this at start-up, before it answers; in-process users (tests, benchmarks) may let the first schema do it."""
        self._llg_tokenizer()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=self._eos)
            return self._tokenizer

    @staticmethod
    def key(schema: dict | bool) -> str:
        """The schema's canonical JSON text: what the cache is keyed by, and what llguidance compiles."""
        return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def cached(self, source: str) -> Grammar | None:
        """The compiled grammar of this key(schema) if it was compiled before (cheap: no thread needed)."""
        with self._lock:
            hit = self._cache.get(source)
            if hit is not None:
                self._cache.move_to_end(hit.source)
            return hit

    def json_schema(self, schema: dict | bool) -> Grammar:
        """Compiles a JSON schema; raises GrammarError with llguidance's reason when it cannot be enforced."""
        return self.compile(self.key(schema))

    def compile(self, source: str) -> Grammar:
        """json_schema() for a schema already turned into its key (the API measures its size first)."""
        if (hit := self.cached(source)) is not None:
            return hit
        tokenizer = self._llg_tokenizer()
        try:
            # Compact JSON (no whitespace between tokens): with free whitespace (llguidance's and vLLM's default)
            # a weak model can spend every token on spaces and newlines between the braces. A schema may still ask
            # for it with llguidance's own {"x-guidance": {"whitespace_flexible": true}}.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise GrammarError(str(e)) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise GrammarError(messages[0] if messages else "invalid schema")
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        template.compute_bitmask()  # warms the lexer for the first token; copies start warm
        compiled = Grammar(template, source)
        with self._lock:
            self._cache[source] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_grammar_masks(logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None], mask_words: int) -> None:
    """Sets to -inf, in place, every logit the row's matcher forbids. logits [B, V]; matchers[i] is row i's
    matcher or None (that row is left exactly as it is); mask_words: the compiler's words per bitmask row."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = torch.empty(len(rows), mask_words, dtype=torch.int32)
    for k, i in enumerate(rows):
        # Fills the row in place (llguidance drops the GIL while it computes).
        matchers[i].unsafe_compute_mask_ptr(bitmask[k].data_ptr(), mask_words * 4)
    # Bit j of word w allows token 32w + j. Unpacked by shifts, measured faster on this CPU than a byte lookup
    # table or llguidance's one-byte-per-token bias (0.5 ms against 0.9 and 1.4 ms for 16 rows of 49k tokens).
    # The words cover every logit (the compiler sized them), so the slice only drops the padding bits.
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    forbidden = (bits.view(len(rows), -1)[:, :logits.shape[1]] == 0).to(logits.device)
    for k, i in enumerate(rows):
        logits[i].masked_fill_(forbidden[k], float("-inf"))


__all__ = ["Grammar", "GrammarCompiler", "GrammarError", "apply_grammar_masks"]
