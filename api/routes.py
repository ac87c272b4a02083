"""The routes' handlers (Routes): each request parsed where api/offload.py says, submitted to the engine through
EngineClient alone, and answered whole or streamed in its route's shape (api/formats.py)."""
from __future__ import annotations

import asyncio
import contextlib

from jinja2 import TemplateError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from batcher.engine_client import EngineStopped
from batcher.engine_client import EngineClient
from batcher.request import RequestOutput, RequestStream
from batcher.request_queue import Overloaded
from model_runner.errors import InvalidRequestError, InvalidSamplingParams
from model_runner.grammar import GrammarError
from model_runner.text import decode

from . import schemas
from .bodies import body_bytes, parse_body
from .chat import chat_prompt_ids
from .errors import APIError, ClientGone, error_response, failure, shutting_down, told_at_end
from .formats import (ChatFormat, Collected, CompletionFormat, GenerateFormat, error_event, replica_header,
                      usage_of)
from .logprobs import TokenTexts
from .metrics import Metrics
from .offload import OFFLOAD_BYTES, OFFLOAD_WEIGHT, PrepThread, byte_bound, json_response
from .openapi import openapi_document
from .response_format import compile_response_format, requested_schema, schema_refused
from .schemas import Model, ParsedRequest, chat_messages, prompt_ids, sampling_params, spec, value
from .settings import ServerSettings
from .version import version_info


async def watch_disconnect(request: Request, streams: list[RequestStream]) -> None:
    """Aborts the request in the engine when the client goes away (frees its KV blocks within a step)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            request.state.client_closed = True
            for stream in streams:
                stream.abort()
            return


async def merged(streams: list[RequestStream]):
    """(choice index, output) from every sample's stream as they come, until all have finished."""
    if len(streams) == 1:  # the common case: no tasks, no extra queue
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        async for out in stream:
            queue.put_nowait((i, out))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, out = await queue.get()
            left -= out.finished
            yield i, out
    finally:
        for t in tasks:
            t.cancel()


class Routes:
    """Every route's handler, over any engine that implements EngineClient (one process, or replicas): it asks
    nothing else of it. What the handlers share is read once, here."""

    def __init__(self, engine: EngineClient, settings: ServerSettings, metrics: Metrics):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.tokenizer = engine.tokenizer
        self.model = Model(engine.model_info.max_model_len, engine.model_info.vocab_size, byte_bound(self.tokenizer))
        self.texts = TokenTexts(self.tokenizer)
        self.prep = PrepThread(self.tokenizer)  # where a large request's parsing, tokenizing and answer are done
        self.document = openapi_document(settings.model_name, self.model)
        self.version = version_info()  # what this process runs: read once, at start

    async def prepared(self, request: Request, route: str, prepare):
        """prepare(body, tokenizer) on the parsed body: on the loop for a small body, as ever; on the prep thread,
        with its own self.tokenizer, for a large one (api/offload.py)."""
        raw = await body_bytes(request, self.settings)
        if len(raw) <= OFFLOAD_BYTES:
            return prepare(parse_body(raw, route), self.tokenizer)
        return await self.prep.run(lambda: prepare(parse_body(raw, route), self.prep.tokenizer))

    async def submit(self, parsed: ParsedRequest, body: dict) -> list[RequestStream]:
        parsed.params.grammar = await compile_response_format(body, self.engine, self.prep)
        try:
            return await self.engine.add_parallel_requests(parsed.prompt_ids, parsed.params, parsed.n)
        except GrammarError as e:  # over replicas: the replica that compiled the schema refused it
            raise schema_refused(requested_schema(body)[1], e) from None
        except InvalidSamplingParams as e:
            raise schemas.invalid(str(e)) from None
        except InvalidRequestError as e:
            raise APIError(400, str(e), code="invalid_prompt") from None
        except Overloaded as e:
            raise APIError(429, str(e), "overloaded", "overloaded",
                           {"Retry-After": str(max(1, round(e.retry_after)))}) from None
        except EngineStopped as e:
            raise shutting_down(str(e)) from None

    async def respond(self, request: Request, body: dict, parsed: ParsedRequest, fmts: list) -> Response:
        """Runs the request (n samples: one format each, fmts[i] for choice i) and answers whole or streamed."""
        streams = await self.submit(parsed, body)
        watcher = asyncio.create_task(watch_disconnect(request, streams))
        outputs = merged(streams)
        if not parsed.stream:
            collected = [Collected() for _ in streams]
            try:
                async for i, out in outputs:
                    collected[i].add(out)
            finally:
                watcher.cancel()
            finals = [c.final for c in collected]
            for final in finals:
                self.metrics.observe_request(final)
            request.state.usage = totals = usage_of(finals)
            if getattr(request.state, "client_closed", False):
                raise ClientGone()
            if err := next((e for f in finals if (e := failure(f))), None):
                raise err

            def answer() -> Response:
                return json_response(fmts[0].whole([f.full(c.text, c.final, c.logprobs, c.prompt_logprobs)
                                                    for f, c in zip(fmts, collected)], totals),
                                     replica_header(streams))
            if sum(f.weight(c) for f, c in zip(fmts, collected)) <= OFFLOAD_WEIGHT:
                return answer()
            return await self.prep.run(answer)  # a large answer (n x echo x logprobs) is built off the loop
        # Streaming: wait for the first output, so a request that fails before its first token (deadline,
        # shutdown) still gets a proper status code instead of a 200 with an error inside.
        try:
            first = await anext(outputs)
        except BaseException:
            watcher.cancel()
            await outputs.aclose()
            raise
        if first[1].finished and not told_at_end(first[1]) and (err := failure(first[1])):
            watcher.cancel()
            await outputs.aclose()
            raise err

        async def events():
            finals: dict[int, RequestOutput] = {}
            i, out = first
            try:
                while True:
                    # failed mid-stream: an error event, not text (unless told once, at the end)
                    if out.finished and not told_at_end(out) and (err := failure(out)):
                        yield error_event(err)
                    else:
                        fmt = fmts[i]  # the echoed prompt's logprobs make a large chunk: built off the loop
                        for event in (fmt.chunks(out) if fmt.weight(out) <= OFFLOAD_WEIGHT
                                      else await self.prep.run(fmt.chunks, out)):
                            yield event
                    if out.finished:
                        finals[i] = out
                        if len(finals) == len(streams):
                            break
                    i, out = await anext(outputs)
                for final in finals.values():
                    self.metrics.observe_request(final)
                request.state.usage = totals = usage_of([finals[k] for k in sorted(finals)])
                if parsed.include_usage:
                    for event in fmts[0].usage_chunk(totals):
                        yield event
                if cut := [f for f in finals.values() if told_at_end(f)]:
                    yield error_event(failure(cut[0]))
                for event in fmts[0].end():
                    yield event
            finally:
                watcher.cancel()
                await outputs.aclose()
                if len(finals) < len(streams):  # the client went away mid-stream
                    request.state.client_closed = True
                    for stream in streams:
                        stream.abort()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **replica_header(streams)})

    def formats(self, cls, parsed: ParsedRequest) -> list:
        """One format per sample; the choices of one answer share its id and creation time."""
        fmts = [cls(self.settings.model_name, parsed, self.texts, i) for i in range(parsed.n)]
        for f in fmts[1:]:
            f.id, f.created = fmts[0].id, fmts[0].created
        return fmts

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"model {str(name)[:100]!r} is not served here; this server serves "
                                f"{self.settings.model_name!r}", "invalid_request_error", "model_not_found")

    def openai_request(self, body: dict, route: str, ids: list[int], default_max_tokens: int, tok) -> ParsedRequest:
        value(body, spec(route, "model"))
        self.check_model(body)
        n = value(body, spec(route, "n"))
        value(body, spec(route, "user"))
        stream = value(body, spec(route, "stream"))
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or set(options) - {"include_usage"} \
                    or not isinstance(options.get("include_usage", False), bool):
                raise schemas.invalid("'stream_options' must be {\"include_usage\": true or false}", "invalid_type")
        echo = route == "/v1/completions" and value(body, spec(route, "echo"))
        return ParsedRequest(ids, sampling_params(body, route, self.model, len(ids), default_max_tokens, n), stream,
                             bool((options or {}).get("include_usage")), echo,
                             self.echo_text(body, ids, tok) if echo else "", n)

    # Each route's request is made by a plain function of (body, tokenizer), run where prepared() says.
    def generate_request(self, body: dict, tok) -> tuple[dict, ParsedRequest]:
        ids = prompt_ids(body, tok, model=self.model)
        return body, ParsedRequest(ids, sampling_params(body, "/generate", self.model, len(ids),
                                                        self.settings.generate_max_tokens),
                                   value(body, spec("/generate", "stream")))

    async def generate(self, request: Request) -> Response:
        body, parsed = await self.prepared(request, "/generate", self.generate_request)
        return await self.respond(request, body, parsed, self.formats(GenerateFormat, parsed))

    def completion_request(self, body: dict, tok) -> tuple[dict, ParsedRequest]:
        return body, self.openai_request(body, "/v1/completions", prompt_ids(body, tok, model=self.model), 16, tok)

    async def completions(self, request: Request) -> Response:
        body, parsed = await self.prepared(request, "/v1/completions", self.completion_request)
        return await self.respond(request, body, parsed, self.formats(CompletionFormat, parsed))

    def echo_text(self, body: dict, ids: list[int], tok) -> str:
        """The prompt as the client sent it, if text; else its ids decoded."""
        prompt = body["prompt"]
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str) else prompt
        return prompt if isinstance(prompt, str) else decode(tok, ids, skip_special_tokens=False)

    def chat_ids(self, body: dict, tok, add_generation_prompt: bool = True, fit: bool = True) -> list[int]:
        """fit: a chat whose rendering alone proves it too long for the context window is refused before it is
        tokenized (one more rendering, for long chats only; a template error is told by chat_prompt_ids)."""
        messages = chat_messages(body)
        bound = self.model.byte_bound
        if fit and bound is not None and tok.chat_template \
                and 4 * sum(len(m["content"]) for m in messages) > bound.token_bytes * (self.model.max_model_len - 1):
            with contextlib.suppress(TemplateError):
                text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
                schemas.check_text_size(text, self.model, "the chat, as its template renders it,")
        return chat_prompt_ids(messages, tok, self.settings.allow_special_tokens_in_content, add_generation_prompt)

    async def chat_completions(self, request: Request) -> Response:
        body, parsed = await self.prepared(request, "/v1/chat/completions", self.chat_request)
        return await self.respond(request, body, parsed, self.formats(ChatFormat, parsed))

    def chat_request(self, body: dict, tok) -> tuple[dict, ParsedRequest]:
        route = "/v1/chat/completions"
        ids = self.chat_ids(body, tok)
        newer = value(body, spec(route, "max_completion_tokens"), hi=self.model.max_model_len - 1)
        if newer is not None:  # never both (fields.RULES)
            body["max_tokens"] = newer
        # Chat defaults to "until the context is full", as OpenAI's does.
        return body, self.openai_request(body, route, ids, self.model.max_model_len, tok)

    async def tokenize(self, request: Request) -> Response:
        return await self.prepared(request, "/tokenize", self.tokenize_answer)

    def tokenize_answer(self, body: dict, tok) -> Response:
        route = "/tokenize"  # counts tokens: a text longer than the context window is counted, not refused
        self.check_model(body)
        if body.get("messages") is not None:
            ids = self.chat_ids(body, tok, value(body, spec(route, "add_generation_prompt")), fit=False)
        else:
            text = value(body, spec(route, "prompt"))
            ids = tok(text, add_special_tokens=value(body, spec(route, "add_special_tokens")))["input_ids"]
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": self.model.max_model_len})

    async def detokenize(self, request: Request) -> Response:
        return await self.prepared(request, "/detokenize", self.detokenize_answer)

    def detokenize_answer(self, body: dict, tok) -> Response:
        self.check_model(body)
        if body.get("tokens") is None:
            raise schemas.invalid("'tokens' is required", "missing_field")
        ids = schemas.token_ids(body, "tokens", self.model.vocab_size, self.model.max_model_len)
        return json_response({"prompt": tok.decode(ids)})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self.document)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "jitney",
            "max_model_len": self.engine.model_info.max_model_len}]})

    async def version_route(self, request: Request) -> Response:
        return JSONResponse(self.version)

    async def health(self, request: Request) -> Response:
        if self.engine.alive and not self.settings.draining:
            return JSONResponse({"status": "ok"})
        return error_response(503, "shutting down" if self.settings.draining else "engine loop is not running",
                              "unavailable", "unhealthy")

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
