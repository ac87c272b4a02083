"""Response shapes, one per route (/generate, completions, chat): a whole answer, or its SSE chunks; usage, and the
error event a stream ends with."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from batcher.request import RequestOutput
from model_runner.sampler import TokenLogprob

from .errors import APIError
from .logprobs import TokenTexts, chat_logprobs, completion_logprobs, generate_logprobs
from .offload import json_text, json_weight
from .schemas import ParsedRequest


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


def error_event(e: APIError) -> str:
    return sse({"error": {"message": e.message, "type": e.type, "code": e.code}})


def replica_header(streams) -> dict[str, str]:
    """Which replica serves the request (replicas/: streams from a RemoteEngine say; one process has none)."""
    replica = getattr(streams[0], "replica", None)
    return {"x-jitney-replica": replica} if replica else {}


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
