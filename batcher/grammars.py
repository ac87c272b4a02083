"""response_format's grammars, compiled for the engine that runs the request: off the event loop, a few at once.

A compile is bounded (model_runner/grammar.py COMPILE_LIMITS: refused past ~0.3 s of lexer work, measured), runs in
the default thread pool (5-6 threads on a 2-core machine) and competes with the model step for the cores: at most
MAX_COMPILES run at once, so a burst of new schemas cannot take every pool thread. A compile waits for a slot up to
COMPILE_WAIT_S, several bounded compiles' worth; then TooManyCompiles (the API's 429 with Retry-After). A cache hit
needs no thread and no slot.
"""
from __future__ import annotations

import asyncio

from model_runner.grammar import Grammar, GrammarCompiler

from .request_queue import Overloaded

MAX_COMPILES = 2
COMPILE_WAIT_S = 2.0


class TooManyCompiles(Overloaded):
    """Every compile slot stayed busy for COMPILE_WAIT_S."""


class CompileSlots:
    """One engine's compile slots (the semaphore binds to the event loop that first waits on it)."""

    def __init__(self, max_compiles: int = MAX_COMPILES):
        self.max_compiles = max_compiles
        self._slots = asyncio.Semaphore(max_compiles)

    async def compile(self, compiler: GrammarCompiler, source: str) -> Grammar:
        """compiler.compile(source) in a worker thread; raises GrammarError or TooManyCompiles."""
        if (hit := compiler.cached(source)) is not None:
            return hit
        try:
            async with asyncio.timeout(COMPILE_WAIT_S):  # (an acquire cancelled after it was granted gives it back)
                await self._slots.acquire()
        except TimeoutError:
            raise TooManyCompiles(f"too many new response_format schemas are compiling (at most {self.max_compiles} "
                                  "at once); retry shortly, or reuse a schema (compiled ones are cached)", 1.0) from None
        # The slot is freed when the compile ends, not when this request stops waiting (a client that leaves does
        # not stop the thread): the count is of compiles running.
        compiling = asyncio.ensure_future(asyncio.to_thread(compiler.compile, source))
        compiling.add_done_callback(lambda _: self._slots.release())
        return await asyncio.shield(compiling)
