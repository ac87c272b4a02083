"""A request's size-proportional CPU work, kept off the event loop.

The event loop serves every connection: while it parses a megabyte of JSON, tokenizes it or builds a
many-megabyte answer for one request, /health and every other token stream wait. So that work runs on one
"prep" thread when the request is large (a body over OFFLOAD_BYTES, an answer heavier than OFFLOAD_WEIGHT),
and on the loop as before when it is small: a thread hop costs tens of microseconds, a real share of a small
request's whole cost in the serving benchmark.

A thread only helps if it lets go of the GIL; three things see to that:
- It has its own copy of the tokenizer: model_runner.text.encode sets a flag on the Rust tokenizer at every
  call (split_special_tokens), so two threads must not share one.
- Long texts are encoded through the Rust call that releases the GIL (model_runner/text.py); the plain call
  holds it for the whole text, and a thread holding the GIL stalls the loop as surely as the loop itself.
- JSON built on this thread is serialized in pieces (json_pieces): json.dumps is one C call that holds the GIL.
- The cyclic garbage collector is paused while it works (PrepThread._without_gc): a collection holds the GIL.

And before any of it, the cheap bounds: a text prompt whose byte length alone proves it cannot fit the context
window is refused before it is tokenized (byte_bound).
"""
from __future__ import annotations

import asyncio
import copy
import gc
import json
import threading
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from starlette.responses import JSONResponse, Response

OFFLOAD_BYTES = 4096        # request bodies above this are parsed and tokenized on the prep thread
OFFLOAD_WEIGHT = 1 << 16    # answers heavier than this (json_weight) are built on it
LOGPROB_WEIGHT = 64         # one logprob entry ({"token", "logprob", "bytes"}) weighs about this many characters
PIECE_CHARS = 1 << 15       # about this much JSON per json.dumps call on the prep thread (a fraction of a ms)

_local = threading.local()


def on_prep_thread() -> bool:
    return getattr(_local, "prep", False)


class PrepThread:
    """The one thread a large request's parsing, tokenizing and answer-building run on, with its own tokenizer.
    One thread: large requests queue behind each other here (on 2 cores there is no more to gain), never in
    front of a small one."""

    def __init__(self, tokenizer):
        self.tokenizer = copy.deepcopy(tokenizer)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="jitney-prep", initializer=self._mark)

    @staticmethod
    def _mark() -> None:
        _local.prep = True

    async def run(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._without_gc, fn, args)

    @staticmethod
    def _without_gc(fn: Callable, args: tuple) -> Any:
        """fn(*args) with Python's cyclic garbage collector paused. Building a large answer allocates hundreds of
        thousands of dicts and lists; that growth triggers full collections, each a walk of the whole heap with
        the GIL held (four of 0.3-0.5 s each for the largest chat answer, measured on a loaded 2-core machine):
        the very stall this thread is here to avoid. What is built here has no cycles; reference counting frees
        it as soon as it is sent. (One thread toggles it, this one; it is back on when fn returns.)"""
        paused = gc.isenabled()
        gc.disable()
        try:
            return fn(*args)
        finally:
            if paused:
                gc.enable()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- JSON in pieces -------------------------------------------------------------------------------------

_STYLES = {True: {"separators": (",", ":"), "allow_nan": False},  # Starlette's JSONResponse
           False: {"separators": (", ", ": "), "allow_nan": True}}  # json.dumps' own (Server-Sent Events)


def _dumps(value: Any, compact: bool = True) -> str:
    return json.dumps(value, ensure_ascii=False, **_STYLES[compact])


def json_pieces(value: Any, out: list[str], compact: bool = True) -> None:
    """Appends the JSON text of value to out in pieces, each one json.dumps call of about PIECE_CHARS (the GIL
    is free between calls). The pieces join to exactly _dumps(value, compact). Small containers are walked into,
    so a list of a few huge items (the choices of an answer) is split inside its items; a long list is cut into
    runs of as many items as make PIECE_CHARS, by the size of its first (a list's items share a shape here)."""
    item, key = _STYLES[compact]["separators"]
    if isinstance(value, dict) and len(value) <= 16 and all(isinstance(k, str) for k in value):
        out.append("{")
        for i, (k, v) in enumerate(value.items()):
            out.append((item if i else "") + _dumps(k) + key)
            json_pieces(v, out, compact)
        out.append("}")
    elif isinstance(value, list) and 0 < len(value) <= 16:
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(item)
            json_pieces(v, out, compact)
        out.append("]")
    elif isinstance(value, list) and len(value) > 16:
        step = max(1, PIECE_CHARS // (len(_dumps(value[0], compact)) + 1))
        out.append("[")
        for i in range(0, len(value), step):
            out.append((item if i else "") + _dumps(value[i:i + step], compact)[1:-1])
        out.append("]")
    else:
        out.append(_dumps(value, compact))


def json_text(value: Any, compact: bool = True) -> str:
    """JSON text as a response sends it: one json.dumps call on the loop, in pieces on the prep thread."""
    if not on_prep_thread():
        return _dumps(value, compact)
    out: list[str] = []
    json_pieces(value, out, compact)
    return "".join(out)


def json_response(content: Any, headers: dict[str, str] | None = None) -> Response:
    """JSONResponse(content), with the same bytes; built on the prep thread, serialized in pieces."""
    if not on_prep_thread():
        return JSONResponse(content, headers=headers)
    return Response(json_text(content).encode("utf-8"), media_type="application/json", headers=headers)


def json_weight(text_chars: int, logprob_entries: int) -> int:
    """About how many characters an answer's JSON holds: its text, and its logprob entries."""
    return text_chars + LOGPROB_WEIGHT * logprob_entries


# --- bytes before tokens --------------------------------------------------------------------------------

_KEEPS_ALL_TEXT = {"Split", "Punctuation"}  # pre-tokenizers that only cut, unless told to remove what they match


@dataclass(frozen=True)
class ByteBound:
    """No token stands for more than token_bytes bytes of text, and every byte of a text's UTF-8 but those in
    dropped (bytes the vocabulary has no token for, which BPE leaves out) is part of some token."""
    token_bytes: int
    dropped: bytes = b""

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of text, however it is cut into pieces for encoding (one pass, no BPE)."""
        return -(-len(text.encode("utf-8", "surrogatepass").translate(None, self.dropped)) // self.token_bytes)


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> character map, the ByteLevel pre-tokenizer's alphabet."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs, shifted = bs[:], 0
    for b in range(256):
        if b not in bs:  # the unprintable ones are shifted past 255
            bs.append(b)
            cs.append(256 + shifted)
            shifted += 1
    return dict(zip(bs, map(chr, cs)))


def byte_bound(tokenizer) -> ByteBound | None:
    """The bound for tokenizers that provably turn every byte of their input into part of some token; None
    where that cannot be shown from the tokenizer's own description.

    The proof, for a byte-level BPE with no normalizer (SmolLM2, Llama 3, GPT-2 and the tiny test model): the
    ByteLevel pre-tokenizer maps each input byte to one character of its 256-character alphabet, and splits
    drop nothing; BPE tokens join such characters (so a token's string length is its byte count) and leave out
    a character the vocabulary has no token for (SmolLM2 has none for 21 bytes, some ASCII controls among them);
    an added token covers exactly its content's bytes, unless it also swallows neighbouring whitespace
    (lstrip/rstrip), which is unbounded. A normalizer may delete text (strip accents, control characters), so
    none is allowed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("unk_token") is not None \
            or not any(s.get("type") == "ByteLevel" for s in steps) \
            or not all(s.get("type") == "ByteLevel" or (s.get("type") in _KEEPS_ALL_TEXT
                                                        and s.get("behavior") != "Removed") for s in steps):
        return None  # (an unknown token could stand for any run of text)
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    chars, vocab = _byte_chars(), model.get("vocab") or {}
    alphabet = set(chars.values())
    byte_tokens = (len(s) for s in vocab if set(s) <= alphabet)  # the others can come from added tokens only
    longest = max(max(byte_tokens, default=1), max((len(t["content"].encode("utf-8")) for t in added), default=1))
    return ByteBound(longest, bytes(sorted(b for b, c in chars.items() if c not in vocab)))
