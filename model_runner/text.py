"""Text <-> token ids on the serving path, through the Rust `tokenizers` object when there is one.

A fast Hugging Face tokenizer is a Python wrapper around a Rust `tokenizers.Tokenizer`; for the short texts a
server sees per request and per step, the wrapper's argument handling and BatchEncoding cost several times the
Rust call itself (transformers 5.24 on a Zen 3: encode 40 µs against 5.4 µs, decode 4.6 against 1.7 µs). These
two functions call the Rust object as the wrapper would (special tokens in the text recognised unless
split_special_tokens; no clean-up of spaces on decode), so ids and text are the same as
`tokenizer(...)["input_ids"]` and `tokenizer.decode(...)`, which tests/test_text.py checks over every kind of text.
A slow (pure Python) tokenizer, or one the wrapper has set to truncate or pad, goes through the wrapper.
"""
from __future__ import annotations


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


def encode(tokenizer, text: str, split_special_tokens: bool | None = None) -> list[int]:
    """The ids of text, with no BOS/EOS added. Special-token text (e.g. "<|im_start|>") is read as the special
    token, unless split_special_tokens (then as plain characters); None = the tokenizer's own setting."""
    if split_special_tokens is None:
        split_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    backend = _backend(tokenizer)
    if backend is None:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
    backend.encode_special_tokens = split_special_tokens  # a setting of the shared object: set on every call
    return _encode(backend, text).ids


def encode_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """The ids of text, special tokens read as such, and each token's (start, end) character offsets in it;
    None for a tokenizer that has no offsets (a slow one)."""
    backend = _backend(tokenizer)
    if backend is None:
        if not getattr(tokenizer, "is_fast", False):
            return None
        enc = tokenizer(text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    backend.encode_special_tokens = False
    enc = _encode(backend, text)
    if len(text) <= GIL_FREE_CHARS:
        return enc.ids, enc.offsets
    # .offsets builds its whole list of tuples holding the GIL (a quarter of a second for 10^5 tokens); one
    # token's at a time lets it go between calls, the same offsets.
    ids = enc.ids
    return ids, [enc.token_to_chars(i) for i in range(len(ids))]


# The Rust encode holds the GIL for the whole text (seconds for a megabyte), so a thread encoding a long text
# would stall the event loop as surely as the loop itself; encode_batch lets the GIL go, with the same ids and
# offsets (tests/test_event_loop.py). Short texts keep the plain call, the serving path's as before.
GIL_FREE_CHARS = 4096


def _encode(backend, text: str):
    if len(text) > GIL_FREE_CHARS:
        return backend.encode_batch([text], add_special_tokens=False)[0]
    return backend.encode(text, add_special_tokens=False)


def decode(tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    """The text of ids, spaces as decoded (no clean-up: it would rewrite " ." across token boundaries)."""
    backend = _backend(tokenizer)
    if backend is None:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    return backend.decode(ids, skip_special_tokens=skip_special_tokens)
