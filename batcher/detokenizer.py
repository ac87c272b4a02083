"""Streaming detokenization: output token ids in, text deltas out, the way vLLM and TGI do it.

Decoding the whole output at every step would cost O(length) per step, quadratic over a long generation. Instead
a small window is decoded twice, without and with the new tokens, and the difference is the new text:

    ids:  ... | already emitted (context) | pending |
              ^ prefix_offset             ^ read_offset

The context is there because a token's text can depend on its neighbours (SentencePiece drops the leading space of
the first token of a decode; byte-level tokens may carry half a character). Two kinds of text are held back: a
window that decodes to a trailing U+FFFD (a multi-byte character split across tokens, completed by the next ones),
and a tail that could be the start of a stop string.
"""
from __future__ import annotations

from model_runner.text import decode

# Prompt tokens that seed the window, so the first output token decodes as it does inside the whole sequence.
PROMPT_CONTEXT_TOKENS = 5
INCOMPLETE_CHAR = "\ufffd"  # what a decoder writes for a partial UTF-8 sequence


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas, one call per step."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(self._ids).endswith(INCOMPLETE_CHAR):
            # A prompt given as ids may end inside a character: the output's first bytes would then complete it,
            # and the output text would differ from its own decode. Such an output starts without context.
            self._ids = []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._held = ""  # decoded text not yet emitted because it may be the start of a stop string
        self._text = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        return self._text

    def push(self, new_token_ids: list[int]) -> str:
        """The new text that is safe to emit now ("" while a character or a possible stop string is incomplete)."""
        if self._stopped:
            return ""
        self._ids.extend(new_token_ids)
        return self._release(self._decode_pending(final=False), final=False)

    def flush(self) -> str:
        """At the end of the generation: all text still held back, up to a stop string if one completes in it."""
        if self._stopped:
            return ""
        return self._release(self._decode_pending(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return decode(self._tokenizer, ids, self._skip_special_tokens)

    def _decode_pending(self, final: bool) -> str:
        if self._read_offset == len(self._ids):  # no token since the last text went out: nothing can be new
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        # Nothing new (a skipped special token): keep the window, so the next token still decodes in context.
        if len(new_text) <= len(prefix_text) or (new_text.endswith(INCOMPLETE_CHAR) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def _release(self, delta: str, final: bool) -> str:
        # Any stop string that can still match starts inside the held text, so only it and the delta are searched.
        text = self._held + delta
        starts = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if starts:
            self._stopped = True
            out, self._held = text[:min(starts)], ""
        else:
            keep = 0 if final else self._stop_prefix_len(text)
            out, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self._text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        return max((k for s in self._stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
