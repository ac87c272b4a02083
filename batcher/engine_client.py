"""EngineClient: everything the HTTP layer (api/) may ask of an engine, declared once.

Two engines implement it: batcher.engine.Engine (the model in this process) and replicas.remote_engine.
RemoteEngine (replicas behind a Ray Serve handle). api/ is written against this protocol alone, so the two cannot
drift apart unnoticed: tests/test_engine_client.py checks both against it, signatures included. The shape follows
vLLM's EngineClient (vllm/engine/protocol.py): requests in, output streams out, abort with a reason, the tokenizer
and model facts the API validates with, a response format compiled below the door, stats, health, shutdown; and
one optional capability, the live step events the dashboard streams (step_hub: None where there are none).

Errors a caller must expect from add_request/add_parallel_requests: InvalidRequestError (and its InvalidSamplingParams,
GrammarError), Overloaded (batcher.request_queue), EngineStopped (batcher.engine).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from model_runner.sampling_params import SamplingParams

from .request import EndReason, RequestOutput
from .stats import EngineStats, StepRecord
from .step_view import StepHub

MAX_N = 16  # parallel samples per request (OpenAI's n): every engine's limit, and the API's


class EngineStopped(Exception):
    """The engine is shutting down and accepts no new requests (any engine; the API answers 503)."""


@dataclass(frozen=True)
class ModelInfo:
    """The model facts the API checks requests against and reports (the runner's, wherever it runs)."""
    name: str            # what was loaded (a hub id or a directory); the served name is the API's own setting
    max_model_len: int   # the context window: prompt + output tokens
    vocab_size: int      # token ids the model has logits for
    block_size: int      # tokens per KV block (the prefix cache's unit)
    description: str     # one line for the start-up log: layers, precision, KV cache, kernels


@runtime_checkable
class OutputStream(Protocol):
    """One sample's outputs; the last has finished=True. abort() ends it at the engine's next step boundary."""
    request_id: str

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    def abort(self) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    model_info: ModelInfo
    # Tokenize, detokenize and the chat template: the model's Hugging Face tokenizer. The API tokenizes in its own
    # process (and on its prep thread, with a copy), so prompts reach the engine as ids.
    tokenizer: object
    requests: Mapping[str, object]                  # in flight, by request id (a drain aborts them all)
    step_observers: list[Callable[[StepRecord], None]]  # called after every model step (histograms)

    # --- lifecycle and health ---
    async def start(self) -> None: ...

    async def warm_up(self) -> None:
        """Builds now what the first request would otherwise pay for on the event loop (the grammar vocabulary)."""

    @property
    def alive(self) -> bool:
        """Healthy: the loop (or the replicas' front end) is running."""

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stops accepting; in-flight requests may finish for up to grace_s; the rest end with SHUT_DOWN."""

    # --- requests ---
    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None) -> OutputStream: ...

    async def add_parallel_requests(self, prompt_token_ids: list[int], params: SamplingParams, n: int,
                                    request_id: str | None = None) -> list[OutputStream]: ...

    def abort(self, request_id: str, reason: EndReason = EndReason.ABORTED) -> None:
        """Ends every sample of a request; its final output carries `reason` (the first one given wins)."""

    async def compile_grammar(self, source: str) -> object:
        """What SamplingParams.grammar carries for a JSON schema's canonical text (GrammarCompiler.key): a compiled
        Grammar, or the text itself where the engine that runs the request compiles it. Raises GrammarError (the
        schema cannot be enforced) or TooManyCompiles (a 429)."""

    # --- statistics ---
    def stats(self) -> EngineStats: ...

    def config_info(self) -> dict[str, dict[str, str]]: ...

    # --- the dashboard: a capability an engine may lack (None) ---
    def step_hub(self, max_viewers: int, buffer_events: int) -> StepHub | None:
        """A hub for the live viewers of every model step (GET /v1/engine/steps, batcher/step_view.py), or None
        where this process runs no steps to watch (over replicas each replica runs its own)."""
