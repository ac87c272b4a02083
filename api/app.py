"""The HTTP layer: Starlette routes over the engine. No model or scheduling logic lives here.

Routes: POST /generate (jitney's own), POST /v1/completions and /v1/chat/completions (OpenAI-compatible, with
SSE streaming), POST /tokenize and /detokenize (vLLM's shape), GET /v1/models, /health, /metrics and
/openapi.json (the contract, generated from the same field tables the checks use).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field

from jinja2 import TemplateError
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from batcher.engine import EngineStopped
from batcher.engine_client import EngineClient
from batcher.request import RequestOutput, RequestStream
from batcher.request_queue import Overloaded
from model_runner.errors import InvalidRequestError, InvalidSamplingParams
from model_runner.grammar import GrammarError
from model_runner.sampler import TokenLogprob
from model_runner.text import decode

from . import schemas
from .chat import chat_prompt_ids
from .dashboard import KeyFromQuery, dashboard_routes
from .errors import APIError, BodyTimeout, ClientGone, error_response
from .jsonbody import parse_json
from .logprobs import TokenTexts, chat_logprobs, completion_logprobs, generate_logprobs
from .looplag import LoopLag
from .metrics import Metrics
from .offload import OFFLOAD_BYTES, OFFLOAD_WEIGHT, PrepThread, byte_bound, json_response, json_text, json_weight
from .openapi import openapi_document
from .response_format import compile_response_format, requested_schema, schema_refused
from .schemas import (Model, ParsedRequest, chat_messages, check_fields, check_rules, prompt_ids, sampling_params,
                      spec, value)
from .version import version_info

access_log = logging.getLogger("jitney.access")
ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models",
          "/health", "/metrics", "/openapi.json", "/version")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"


@dataclass
class ServerSettings:
    model_name: str
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0      # the whole body must arrive within this (a slow or endless body: 408)
    generate_max_tokens: int = 128    # /generate's default max_tokens (OpenAI completions default to 16)
    allowed_origins: tuple[str, ...] = ()  # CORS: off unless origins are named
    allow_special_tokens_in_content: bool = False
    draining: bool = field(default=False)
    dashboard: bool = True            # GET /dashboard and its stream GET /v1/engine/steps (api/dashboard.py)


# --- helpers ----------------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it passes the limit, whatever Content-Length claimed."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the body is larger than {limit} bytes", code="body_too_large",
                               headers={"Connection": "close"})  # the rest of it is not worth reading
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    except BodyTimeout:
        raise APIError(408, "the request body did not arrive in time; send it whole and promptly",
                       code="body_timeout", headers={"Connection": "close"}) from None
    return b"".join(chunks)


def check_content_type(request: Request) -> None:
    """JSON bodies only. This also keeps web pages out: a browser sends a cross-origin POST without asking
    first only for "simple" content types (text/plain, forms), never for application/json."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got "
                            f"{media[:60] or 'none'!r})", code="unsupported_media_type")


async def body_bytes(request: Request, settings: "ServerSettings") -> bytes:
    check_content_type(request)
    return await read_body(request, settings.max_body_bytes)


def parse_body(raw: bytes, route: str) -> dict:
    """The body as JSON, its fields checked: work that grows with the body (see build_app's prepared())."""
    body = parse_json(raw)
    check_fields(body, route)
    check_rules(body, route)  # conditions between fields (schemas.RULES), before any field is read
    return body


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


def usage(out: RequestOutput) -> dict:
    return usage_of([out])


def usage_of(finals: list[RequestOutput]) -> dict:
    """Parallel samples share their prompt: it counts once; their completions add up."""
    prompt, completion = finals[0].num_prompt_tokens, sum(f.num_output_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Collected:
    """One sample's outputs gathered for a non-streaming answer."""
    text: str = ""
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    final: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.logprobs += out.logprobs or []
        self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        self.final = out


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json_text(data, compact=False)}\n\n"


@dataclass(frozen=True)
class ErrorKind:
    """How the API tells a client of one of the engine's error kinds (RequestOutput.error)."""
    status: int
    type: str
    code: str
    message: str | None = None  # a fixed message; None: the engine's own (RequestOutput.text)
    at_end: bool = False        # in a stream: told once, after the last chunk and usage, not in place of a chunk


ERRORS = {"timeout": ErrorKind(504, "timeout", "queue_timeout"),
          "internal": ErrorKind(500, "server_error", "internal_error"),
          "shutdown": ErrorKind(503, "unavailable", "shutting_down",
                                "the server shut down before the request finished", at_end=True),
          "unavailable": ErrorKind(503, "unavailable", "replica_unavailable"),  # replicas/: its replica is gone
          # response_format: the grammar engine failed mid-output, or the finished document fails the schema
          "invalid_output": ErrorKind(500, "server_error", "invalid_output")}


def shutting_down(message: str) -> APIError:
    """The 503 of a server that is stopping (a request refused by the drain, or by the engine): ERRORS' own."""
    kind = ERRORS["shutdown"]
    return APIError(kind.status, message, kind.type, kind.code)


def failure(out: RequestOutput) -> APIError | None:
    """The HTTP error for a request the engine ended with an error (its kind says which), else None.

    A request the drain cut (kind shutdown) gets a 503 before a response starts, a final error event in a stream
    that has started; a stream cut before its first token still starts, so every stream ends the same way."""
    if out.error is None:
        return None
    kind = ERRORS[out.error]
    return APIError(kind.status, kind.message or out.text, kind.type, kind.code)


def told_at_end(out: RequestOutput) -> bool:
    """A failure a stream reports after its last chunk (ErrorKind.at_end), not where the output comes."""
    return out.error is not None and ERRORS[out.error].at_end


def error_event(e: APIError) -> str:
    return sse({"error": {"message": e.message, "type": e.type, "code": e.code}})


def replica_header(streams) -> dict[str, str]:
    """Which replica serves the request (replicas/: streams from a RemoteEngine say; one process has none)."""
    replica = getattr(streams[0], "replica", None)
    return {"x-jitney-replica": replica} if replica else {}


# --- response shapes, one per route ---------------------------------------------------------------------

class Format:
    """What every route's shape shares: the request it answers, and the logprobs not yet sent in a stream (a
    token whose text the detokenizer still holds back sends its logprobs with the next chunk that has text)."""

    def __init__(self, model: str, parsed: ParsedRequest, texts: TokenTexts, index: int = 0):
        self.model, self.parsed, self.params, self.texts, self.index = model, parsed, parsed.params, texts, index
        self.pending: list[TokenLogprob] = []
        self.pending_prompt: list[TokenLogprob | None] | None = None

    def hold(self, out: RequestOutput) -> None:
        """Keeps an output's logprobs for the next chunk sent (this output sends nothing)."""
        self.pending += out.logprobs or []
        self.pending_prompt = out.prompt_logprobs or self.pending_prompt

    def take_logprobs(self, out: RequestOutput) -> tuple[list[TokenLogprob], list[TokenLogprob | None] | None]:
        """This output's logprobs with any held back before it; the caller now sends them."""
        self.hold(out)
        taken = (self.pending, self.pending_prompt)
        self.pending, self.pending_prompt = [], None
        return taken

    def weight(self, out: RequestOutput | Collected) -> int:
        """About the size of the JSON that sends this output (or this whole sample): where to build it."""
        p = self.params
        return json_weight(len(out.text), len(out.logprobs or ()) * (1 + (p.logprobs or 0))
                           + len(out.prompt_logprobs or ()) * (1 + (p.prompt_logprobs or 0)))

    def end(self) -> list[str]:
        return []

    def usage_chunk(self, totals: dict) -> list[str]:
        return []


class GenerateFormat(Format):
    def whole(self, choices: list[dict], totals: dict) -> dict:
        return choices[0]  # /generate has one sample, whose own usage the body already holds

    def full(self, text: str, out: RequestOutput, logprobs: list[TokenLogprob] = (),
             prompt_logprobs: list[TokenLogprob | None] | None = None) -> dict:
        t = out.timings
        body = {"text": text, "finish_reason": out.finish_reason, "usage": usage(out),
                "timing_ms": {"queue": t.queue_ms, "ttft": t.ttft_ms, "total": t.total_ms}}
        return body | self.logprob_fields(list(logprobs), prompt_logprobs)

    def logprob_fields(self, logprobs: list[TokenLogprob], prompt_logprobs) -> dict:
        fields = {}
        if self.params.logprobs is not None:
            fields["logprobs"] = generate_logprobs(self.texts, logprobs)
        if prompt_logprobs is not None:
            fields["prompt_logprobs"] = generate_logprobs(self.texts, prompt_logprobs)
        return fields

    def chunks(self, out: RequestOutput) -> list[str]:
        if not out.finished:
            if not out.text:  # nothing to show yet: its logprobs wait for the next piece of text
                self.hold(out)
                return []
            return [sse({"text": out.text} | self.logprob_fields(*self.take_logprobs(out)))]
        return [sse(self.full(out.text, out, *self.take_logprobs(out)))]


class CompletionFormat(Format):
    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, model: str, parsed: ParsedRequest, texts: TokenTexts, index: int = 0):
        super().__init__(model, parsed, texts, index)
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.echoed = not parsed.echo  # the prompt goes out once, first
        self.offset = 0                 # text_offset of the next token, in characters of the returned text

    def choice(self, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def wrap(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def render(self, text: str, logprobs: list[TokenLogprob], prompt_logprobs) -> tuple[str, dict | None]:
        """(text, logprobs object) of the next piece: the echoed prompt before the first one."""
        ids, entries = [], []
        if not self.echoed:
            self.echoed = True
            text = self.parsed.echo_text + text
            if prompt_logprobs is not None:
                ids, entries = list(self.parsed.prompt_ids), list(prompt_logprobs)
        if self.params.logprobs is None:
            return text, None
        ids += [e.token_id for e in logprobs]
        entries += logprobs
        shaped = completion_logprobs(self.texts, ids, entries, self.offset)
        self.offset += sum(len(t) for t in shaped["tokens"])
        return text, shaped

    def full(self, text: str, out: RequestOutput, logprobs: list[TokenLogprob] = (),
             prompt_logprobs: list[TokenLogprob | None] | None = None) -> dict:
        """This sample's choice in the whole answer."""
        text, shaped = self.render(text, list(logprobs), prompt_logprobs)
        return self.choice(text, out.finish_reason, shaped)

    def whole(self, choices: list[dict], totals: dict) -> dict:
        return self.wrap(self.object, choices, usage=totals)

    def chunks(self, out: RequestOutput) -> list[str]:
        if not out.finished and not out.text and self.echoed:
            self.hold(out)
            return []
        text, shaped = self.render(out.text, *self.take_logprobs(out))
        return [sse(self.wrap(self.chunk_object, [self.choice(text, out.finish_reason, shaped)]))]

    def weight(self, out: RequestOutput | Collected) -> int:
        return super().weight(out) + (0 if self.echoed else len(self.parsed.echo_text))

    def usage_chunk(self, totals: dict) -> list[str]:
        return [sse(self.wrap(self.chunk_object, [], usage=totals))]

    def end(self) -> list[str]:
        return [sse("[DONE]")]


class ChatFormat(CompletionFormat):
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, parsed: ParsedRequest, texts: TokenTexts, index: int = 0):
        super().__init__(model, parsed, texts, index)
        self.id, self.started = f"chatcmpl-{uuid.uuid4().hex}", False

    def shaped(self, logprobs: list[TokenLogprob]) -> dict | None:
        return None if self.params.logprobs is None else chat_logprobs(self.texts, logprobs)

    def full(self, text: str, out: RequestOutput, logprobs: list[TokenLogprob] = (),
             prompt_logprobs: list[TokenLogprob | None] | None = None) -> dict:
        return {"index": self.index, "message": {"role": "assistant", "content": text},
                "logprobs": self.shaped(list(logprobs)), "finish_reason": out.finish_reason}

    def chunks(self, out: RequestOutput) -> list[str]:
        events = []
        if not self.started:  # the first chunk announces the role, as OpenAI's does
            self.started = True
            events.append(sse(self.wrap(self.chunk_object, [{"index": self.index,
                                                              "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}])))
        if out.text or out.finished:
            delta = {"content": out.text} if out.text else {}
            events.append(sse(self.wrap(self.chunk_object, [{"index": self.index, "delta": delta,
                                                              "logprobs": self.shaped(self.take_logprobs(out)[0]),
                                                              "finish_reason": out.finish_reason}])))
        else:
            self.hold(out)
        return events


# --- the app --------------------------------------------------------------------------------------------

def build_app(engine: EngineClient, settings: ServerSettings):
    """The app over any engine that implements EngineClient (one process, or replicas): it asks nothing else."""
    metrics = Metrics(engine, settings.model_name)
    tokenizer = engine.tokenizer
    model = Model(engine.model_info.max_model_len, engine.model_info.vocab_size, byte_bound(tokenizer))
    texts = TokenTexts(tokenizer)
    prep = PrepThread(tokenizer)  # where a large request's parsing, tokenizing and answer are done
    lag = LoopLag(metrics.registry)

    async def prepared(request: Request, route: str, prepare):
        """prepare(body, tokenizer) on the parsed body: on the loop for a small body, as ever; on the prep thread,
        with its own tokenizer, for a large one (api/offload.py)."""
        raw = await body_bytes(request, settings)
        if len(raw) <= OFFLOAD_BYTES:
            return prepare(parse_body(raw, route), tokenizer)
        return await prep.run(lambda: prepare(parse_body(raw, route), prep.tokenizer))

    async def submit(parsed: ParsedRequest, body: dict) -> list[RequestStream]:
        parsed.params.grammar = await compile_response_format(body, engine, prep)
        try:
            return await engine.add_parallel_requests(parsed.prompt_ids, parsed.params, parsed.n)
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

    async def respond(request: Request, body: dict, parsed: ParsedRequest, fmts: list) -> Response:
        """Runs the request (n samples: one format each, fmts[i] for choice i) and answers whole or streamed."""
        streams = await submit(parsed, body)
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
                metrics.observe_request(final)
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
            return await prep.run(answer)  # a large answer (n x echo x logprobs) is built off the loop
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
                                      else await prep.run(fmt.chunks, out)):
                            yield event
                    if out.finished:
                        finals[i] = out
                        if len(finals) == len(streams):
                            break
                    i, out = await anext(outputs)
                for final in finals.values():
                    metrics.observe_request(final)
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

    def formats(cls, parsed: ParsedRequest) -> list:
        """One format per sample; the choices of one answer share its id and creation time."""
        fmts = [cls(settings.model_name, parsed, texts, i) for i in range(parsed.n)]
        for f in fmts[1:]:
            f.id, f.created = fmts[0].id, fmts[0].created
        return fmts

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name != settings.model_name:
            raise APIError(404, f"model {str(name)[:100]!r} is not served here; this server serves "
                                f"{settings.model_name!r}", "invalid_request_error", "model_not_found")

    def openai_request(body: dict, route: str, ids: list[int], default_max_tokens: int, tok) -> ParsedRequest:
        value(body, spec(route, "model"))
        check_model(body)
        n = value(body, spec(route, "n"))
        value(body, spec(route, "user"))
        stream = value(body, spec(route, "stream"))
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or set(options) - {"include_usage"} \
                    or not isinstance(options.get("include_usage", False), bool):
                raise schemas.invalid("'stream_options' must be {\"include_usage\": true or false}", "invalid_type")
        echo = route == "/v1/completions" and value(body, spec(route, "echo"))
        return ParsedRequest(ids, sampling_params(body, route, model, len(ids), default_max_tokens, n), stream,
                             bool((options or {}).get("include_usage")), echo,
                             echo_text(body, ids, tok) if echo else "", n)

    # Each route's request is made by a plain function of (body, tokenizer), run where prepared() says.
    def generate_request(body: dict, tok) -> tuple[dict, ParsedRequest]:
        ids = prompt_ids(body, tok, model=model)
        return body, ParsedRequest(ids, sampling_params(body, "/generate", model, len(ids),
                                                        settings.generate_max_tokens),
                                   value(body, spec("/generate", "stream")))

    async def generate(request: Request) -> Response:
        body, parsed = await prepared(request, "/generate", generate_request)
        return await respond(request, body, parsed, formats(GenerateFormat, parsed))

    def completion_request(body: dict, tok) -> tuple[dict, ParsedRequest]:
        return body, openai_request(body, "/v1/completions", prompt_ids(body, tok, model=model), 16, tok)

    async def completions(request: Request) -> Response:
        body, parsed = await prepared(request, "/v1/completions", completion_request)
        return await respond(request, body, parsed, formats(CompletionFormat, parsed))

    def echo_text(body: dict, ids: list[int], tok) -> str:
        """The prompt as the client sent it, if text; else its ids decoded."""
        prompt = body["prompt"]
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str) else prompt
        return prompt if isinstance(prompt, str) else decode(tok, ids, skip_special_tokens=False)

    def chat_ids(body: dict, tok, add_generation_prompt: bool = True, fit: bool = True) -> list[int]:
        """fit: a chat whose rendering alone proves it too long for the context window is refused before it is
        tokenized (one more rendering, for long chats only; a template error is told by chat_prompt_ids)."""
        messages = chat_messages(body)
        bound = model.byte_bound
        if fit and bound is not None and tok.chat_template \
                and 4 * sum(len(m["content"]) for m in messages) > bound.token_bytes * (model.max_model_len - 1):
            with contextlib.suppress(TemplateError):
                text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
                schemas.check_text_size(text, model, "the chat, as its template renders it,")
        return chat_prompt_ids(messages, tok, settings.allow_special_tokens_in_content, add_generation_prompt)

    async def chat_completions(request: Request) -> Response:
        body, parsed = await prepared(request, "/v1/chat/completions", chat_request)
        return await respond(request, body, parsed, formats(ChatFormat, parsed))

    def chat_request(body: dict, tok) -> tuple[dict, ParsedRequest]:
        route = "/v1/chat/completions"
        ids = chat_ids(body, tok)
        newer = value(body, spec(route, "max_completion_tokens"), hi=model.max_model_len - 1)
        if newer is not None:  # never both (schemas.RULES)
            body["max_tokens"] = newer
        # Chat defaults to "until the context is full", as OpenAI's does.
        return body, openai_request(body, route, ids, model.max_model_len, tok)

    async def tokenize(request: Request) -> Response:
        return await prepared(request, "/tokenize", tokenize_answer)

    def tokenize_answer(body: dict, tok) -> Response:
        route = "/tokenize"  # counts tokens: a text longer than the context window is counted, not refused
        check_model(body)
        if body.get("messages") is not None:
            ids = chat_ids(body, tok, value(body, spec(route, "add_generation_prompt")), fit=False)
        else:
            text = value(body, spec(route, "prompt"))
            ids = tok(text, add_special_tokens=value(body, spec(route, "add_special_tokens")))["input_ids"]
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len})

    async def detokenize(request: Request) -> Response:
        return await prepared(request, "/detokenize", detokenize_answer)

    def detokenize_answer(body: dict, tok) -> Response:
        check_model(body)
        if body.get("tokens") is None:
            raise schemas.invalid("'tokens' is required", "missing_field")
        ids = schemas.token_ids(body, "tokens", model.vocab_size, model.max_model_len)
        return json_response({"prompt": tok.decode(ids)})

    document = openapi_document(settings.model_name, model)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": 0, "owned_by": "jitney",
            "max_model_len": engine.model_info.max_model_len}]})

    version = version_info()  # what this process runs: read once, at start

    async def version_route(request: Request) -> Response:
        return JSONResponse(version)

    async def health(request: Request) -> Response:
        if engine.alive and not settings.draining:
            return JSONResponse({"status": "ok"})
        return error_response(503, "shutting down" if settings.draining else "engine loop is not running",
                              "unavailable", "unhealthy")

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.warm_up()  # before any request (response_format's vocabulary)
        if not engine.alive:
            await engine.start()
        watch = asyncio.create_task(lag.run())  # jitney_event_loop_lag_seconds (api/looplag.py)
        # What is loaded now (modules, model, tokenizer) lives as long as the process: out of the cyclic GC's
        # sight, so that no full collection, with the GIL held, walks it again (a stall of every stream). What is
        # garbage already is collected first, not kept forever.
        gc.collect()
        gc.freeze()
        yield
        watch.cancel()
        prep.close()
        if engine.alive:  # a drain (server.py) normally stopped it already
            await engine.stop()

    app = Starlette(routes=[
        Route("/generate", generate, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/version", version_route, methods=["GET"]),
    ], lifespan=lifespan)
    if settings.dashboard:  # --no-dashboard leaves both routes out
        app.router.routes.extend(dashboard_routes(engine))
    # "/generate/" is a 404 like any unknown path: Starlette's default answers it with a redirect whose
    # Location is built from the client's own Host header.
    app.router.redirect_slashes = False
    # Every handler is async: Starlette runs a plain function in its thread pool, a thread hop per error answer.
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, method_not_allowed)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    outer = Gatekeeper(app, settings, metrics)
    if settings.dashboard:
        outer = KeyFromQuery(outer)  # the page's ?api_key= (api/dashboard.py)
    if settings.allowed_origins:
        # Outside the key check: a browser's preflight (OPTIONS) carries no key, and must be answered.
        outer = CORSMiddleware(outer, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type", "X-API-Key"])
    outer.metrics = metrics  # whatever wraps the app, its owner finds the registry in one place
    return outer


class NoResponse(Response):
    """Sends nothing: the client is gone (see ClientGone)."""

    def __init__(self) -> None:
        super().__init__(status_code=CLIENT_CLOSED)

    async def __call__(self, scope, receive, send) -> None:
        return None


async def client_gone(request: Request, exc: ClientGone) -> Response:
    request.state.client_closed = True
    return NoResponse()


async def api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def internal_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal error (logged on the server)", "server_error", "internal_error")


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"no route {request.url.path}", code="not_found")


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    # RFC 9110 15.5.6: a 405 must say which methods the route takes (Starlette's Route puts them in exc.headers).
    allow = ", ".join(sorted((getattr(exc, "headers", None) or {}).get("Allow", "").replace(" ", "").split(",")))
    return error_response(405, f"{request.method} is not allowed on {request.url.path} (allowed: {allow})",
                          code="method_not_allowed", headers={"Allow": allow})


class Gatekeeper:
    """ASGI middleware in front of every route: draining (503), API keys (401), body size (413), access log,
    and the HTTP status counter. Pure ASGI, so streaming responses pass through untouched."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path, status = time.perf_counter(), scope["path"], 500
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        deadline, body_done = time.monotonic() + self.settings.body_timeout_s, False

        async def receive_in_time():
            """receive(), but the body must be whole by the deadline (a trickled or endless body: 408).
            After the body, receive() only waits for a disconnect, which may take as long as it likes."""
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout() from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            if rejection := self.reject(path, headers):
                await rejection(scope, receive, send_and_note)
            else:
                await self.app(scope, receive_in_time, send_and_note)
        finally:
            if scope.get("state", {}).get("client_closed"):
                status = CLIENT_CLOSED
            label = path if path in ROUTES else "other"
            self.metrics.http.labels(label, str(status)).inc()
            u = scope.get("state", {}).get("usage") or {}
            client = scope.get("client") or ("-", 0)
            ms = 1000 * (time.perf_counter() - start)
            access_log.info('%s "%s %s" %d %.1fms prompt_tokens=%s completion_tokens=%s', client[0], scope["method"],
                            path, status, ms, u.get("prompt_tokens", "-"), u.get("completion_tokens", "-"),
                            extra={"client": client[0], "method": scope["method"], "path": path, "status": status,
                                   "duration_ms": round(ms, 1), "prompt_tokens": u.get("prompt_tokens"),
                                   "completion_tokens": u.get("completion_tokens")})  # fields of a JSON line

    def reject(self, path: str, headers: dict[str, str]) -> Response | None:
        s = self.settings
        if path == "/health":
            return None
        if s.draining:
            return shutting_down("the server is shutting down").response()
        if s.api_keys:
            auth = headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not any(hmac.compare_digest(key.encode(), k.encode()) for k in s.api_keys):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      "authentication_error", "invalid_api_key")
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > s.max_body_bytes:
            return error_response(413, f"the body is larger than {s.max_body_bytes} bytes", code="body_too_large",
                                  headers={"Connection": "close"})
        return None
