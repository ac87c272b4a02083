"""The HTTP API end to end: a real `jitney serve --model tiny-random` subprocess, driven with httpx and openai.

One module-scoped server (with an API key and a small body limit) takes every test that leaves it as it found
it; tests that need other flags (overload, deadlines, drain, HTTPS) start their own. tiny-random decodes about
a thousand tokens in half a second, so "long" requests here are max_tokens 900 with ignore_eos.
"""
import asyncio
import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import time

import httpx
import openai
import pytest

from .server_helpers import jitney_server, parse_metrics, sse_events, wait_until

KEY = "test-key-1"
TINY = ("--dtype", "float32", "--kv-cache-memory", "32MiB")
ENV = {"OMP_NUM_THREADS": "1"}  # the tiny model steps faster on one thread, and the machine is shared
BODY_LIMIT = 64 * 1024
PROMPT = "The quick brown fox jumps over the lazy dog."
LONG = {"max_tokens": 900, "ignore_eos": True}  # about half a second of decoding on tiny-random (with a
# prompt of up to 124 tokens: prompt + output must fit the 1024-token context, or the output is cut short)


@pytest.fixture(scope="module")
def server():
    with jitney_server(*TINY, "--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT), env=ENV) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """The status, and the OpenAI error shape {"error": {"message", "type", "code"}} with nothing else."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if code is not None:
        assert err["code"] == code, body
    return err


def metrics(client: httpx.Client) -> dict:
    return parse_metrics(client.get("/metrics").text)


def aborts(m: dict) -> float:
    return m.get(("jitney_requests_finished_total", (("reason", "abort"),)), 0.0)


def wait_idle(client: httpx.Client, timeout: float = 5.0) -> dict:
    """Polls /metrics until nothing runs or waits and every KV block is free; returns the last scrape."""
    def idle():
        m = metrics(client)
        done = (m[("jitney_kv_cache_blocks_used", ())] == 0 and m[("jitney_requests_running", ())] == 0
                and m[("jitney_requests_waiting", ())] == 0)
        return m if done else None
    m = wait_until(idle, timeout)
    assert m, f"the server did not go idle within {timeout}s: {metrics(client)}"
    return m


def stream_events(client: httpx.Client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


# --- /generate -------------------------------------------------------------------------------------------------

def test_generate_shape(client):
    r = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "finish_reason", "usage", "timing_ms"}
    assert isinstance(body["text"], str) and body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(PROMPT.encode()), "completion_tokens": 12,
                             "total_tokens": len(PROMPT.encode()) + 12}  # byte-level tokenizer: a token a byte
    t = body["timing_ms"]
    assert set(t) == {"queue", "ttft", "total"}
    assert 0 <= t["queue"] <= t["ttft"] <= t["total"]


def test_generate_streaming(client):
    events = stream_events(client, "/generate", {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True})
    assert events and "[DONE]" not in events  # jitney's own route ends with its final event, no [DONE]
    assert all(isinstance(e, dict) and isinstance(e["text"], str) for e in events)
    *middle, final = events
    assert all(set(e) == {"text"} and e["text"] for e in middle)
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 40
    assert set(final["timing_ms"]) == {"queue", "ttft", "total"}
    streamed = "".join(e["text"] for e in events)
    whole = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True}).json()
    assert streamed == whole["text"]


def test_greedy_is_the_default_and_repeatable(client):
    body = {"prompt": PROMPT, "max_tokens": 30}
    a, b = (client.post("/generate", json=body).json() for _ in range(2))
    assert a["text"] == b["text"] and a["usage"] == b["usage"]
    explicit = client.post("/generate", json={**body, "temperature": 0}).json()
    assert explicit["text"] == a["text"]


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        return client.post("/generate", json=body).json()["text"]
    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1  # a different seed samples something else


def test_stop_string_cuts_the_text(client):
    full = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 60, "ignore_eos": True}).json()["text"]
    # A stop string taken from the middle of the greedy text (not a replacement character of a split byte).
    candidates = [i for i, ch in enumerate(full) if i >= 3 and ch != "\ufffd" and ch.strip()]
    assert candidates, f"no usable stop character in {full!r}"
    stop = full[candidates[len(candidates) // 2]]
    r = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 60, "ignore_eos": True, "stop": [stop]})
    body = r.json()
    assert body["finish_reason"] == "stop"
    assert body["text"] == full[:full.index(stop)] and stop not in body["text"]
    assert body["usage"]["completion_tokens"] < 60


def test_concurrent_requests_get_their_own_text(server, client):
    """Batching changes speed, never text: each greedy answer is the same alone and in a crowd."""
    bodies = [{"prompt": f"Prompt {i}: " + "abc" * i, "max_tokens": 40, "ignore_eos": True} for i in range(10)]
    alone = [client.post("/generate", json=b).json()["text"] for b in bodies]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, headers=client.headers, timeout=30) as ac:
            return await asyncio.gather(*(ac.post("/generate", json=b) for b in bodies))
    crowd = [r.json()["text"] for r in asyncio.run(together())]
    assert crowd == alone


def test_stop_string_when_streaming(client):
    full = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 60, "ignore_eos": True}).json()["text"]
    stop = next(ch for ch in full[5:] if ch != "\ufffd" and ch.strip())
    events = stream_events(client, "/generate", {"prompt": PROMPT, "max_tokens": 60, "ignore_eos": True,
                                                 "stop": stop})
    assert events[-1]["finish_reason"] == "stop"
    assert "".join(e["text"] for e in events) == full[:full.index(stop)]


def test_prompt_as_token_ids(client):
    from model_runner.tiny import byte_level_tokenizer
    ids = byte_level_tokenizer()(PROMPT, add_special_tokens=False)["input_ids"]
    as_ids = client.post("/generate", json={"prompt": ids, "max_tokens": 10}).json()
    as_text = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 10}).json()
    nested = client.post("/v1/completions", json={"prompt": [ids], "max_tokens": 10}).json()
    assert as_ids["text"] == as_text["text"] == nested["choices"][0]["text"]


# --- the OpenAI-compatible routes, with the official client ----------------------------------------------------

def test_openai_models_list(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny-random"]


def test_openai_completion(oai, client):
    c = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=10, extra_body={"ignore_eos": True})
    assert c.object == "text_completion" and c.model == "tiny-random" and c.id.startswith("cmpl-")
    assert len(c.choices) == 1 and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 10 and c.usage.prompt_tokens == len(PROMPT.encode())
    assert c.usage.total_tokens == c.usage.prompt_tokens + 10
    # The same greedy request through /generate says the same thing.
    g = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 10, "ignore_eos": True}).json()
    assert c.choices[0].text == g["text"]


def test_openai_completion_default_max_tokens_is_16(oai):
    c = oai.completions.create(model="tiny-random", prompt=PROMPT, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 16 and c.choices[0].finish_reason == "length"


def test_openai_completion_stream(oai):
    whole = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=25,
                                   extra_body={"ignore_eos": True})
    chunks = list(oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=25, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert all(c.object == "text_completion" and len(c.choices) == 1 for c in text_chunks)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 25


def test_completion_stream_ends_with_done(client):
    events = stream_events(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])


def test_openai_chat(oai):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    c = oai.chat.completions.create(model="tiny-random", messages=messages, max_tokens=20,
                                    extra_body={"ignore_eos": True})
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-")
    msg = c.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 20
    # Streamed deltas concatenate to the very same greedy text.
    chunks = list(oai.chat.completions.create(model="tiny-random", messages=messages, max_tokens=20, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 20


def test_openai_extra_body_sampling_fields(oai):
    c = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=30, temperature=0.8, seed=3,
                               extra_body={"ignore_eos": True, "top_k": 5})
    assert c.usage.completion_tokens == 30 and c.choices[0].finish_reason == "length"


def test_openai_penalties_logit_bias_and_min_p(oai, client):
    """The official client's own fields reach the sampler: each changes the greedy text, and /generate with the
    same fields gives the same text (one implementation behind every route)."""
    plain = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=64,
                                   extra_body={"ignore_eos": True}).choices[0].text
    a = client.post("/tokenize", json={"prompt": "A", "add_special_tokens": False}).json()["tokens"][0]
    forced = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=16, logit_bias={str(a): 100},
                                    extra_body={"ignore_eos": True}).choices[0].text
    assert forced == "A" * 16  # +100 outweighs any logit of this model
    for fields in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.0}):
        text = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=64,
                                      extra_body={"ignore_eos": True}, **fields).choices[0].text
        assert text != plain
        same = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 64, "ignore_eos": True, **fields})
        assert same.json()["text"] == text
    chat = oai.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=8, logit_bias={str(a): 100}, presence_penalty=0.5,
                                       frequency_penalty=0.0, extra_body={"ignore_eos": True, "min_p": 0.1})
    assert chat.choices[0].message.content == "A" * 8  # greedy: min_p only narrows what sampling may pick


@pytest.fixture(scope="module")
def hf_tiny():
    """transformers on tiny-random's weights (the server's model: a seeded random init, the same anywhere)."""
    import torch
    from transformers import AutoModelForCausalLM

    from model_runner.paths import cache_dir
    from model_runner.tiny import tiny_random_dir
    return AutoModelForCausalLM.from_pretrained(tiny_random_dir(cache_dir()), dtype=torch.float32).eval()


def hf_logprobs(hf, ids):
    """float32 log_softmax at every position, and the bound of tests/test_logprobs.py (2e-4 x max|logit|:
    our logits agree with transformers' to 1e-4 of the largest, and log_softmax moves at most twice that)."""
    import torch
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1), 2e-4 * logits.abs().max().item()


def ids_of(client, text):
    return client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]


def test_openai_completion_logprobs_match_transformers(oai, client, hf_tiny):
    c = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=8, logprobs=3,
                               extra_body={"ignore_eos": True})
    lp, prompt = c.choices[0].logprobs, ids_of(client, PROMPT)
    generated = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True,
                                                "logprobs": 0}).json()["logprobs"]
    ids = [e["token_id"] for e in generated]
    ref, tol = hf_logprobs(hf_tiny, prompt + ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for j, (token_id, logprob, top) in enumerate(zip(ids, lp.token_logprobs, lp.top_logprobs)):
        assert abs(logprob - ref[len(prompt) - 1 + j, token_id].item()) < tol
        # The 3 likeliest and the chosen one, keyed by text: byte tokens holding part of a character all read
        # U+FFFD, so keys can merge (OpenAI's shape has the same limit; /generate's lists keep ids).
        assert lp.tokens[j] in top and 1 <= len(top) <= 4
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_openai_echo_scores_the_prompt_like_lm_eval(oai, client, hf_tiny):
    """lm-evaluation-harness's log-likelihood request: echo, logprobs 1, max_tokens 0 (or 1)."""
    prompt = ids_of(client, PROMPT)
    ref, tol = hf_logprobs(hf_tiny, prompt)
    for max_tokens in (0, 1):
        c = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=max_tokens, echo=True, logprobs=1,
                                   temperature=0, extra_body={"ignore_eos": True})
        choice, lp = c.choices[0], c.choices[0].logprobs
        assert choice.text.startswith(PROMPT) and c.usage.completion_tokens == max_tokens
        assert c.usage.prompt_tokens == len(prompt) and len(lp.token_logprobs) == len(prompt) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert abs(lp.token_logprobs[i] - ref[i - 1, prompt[i]].item()) < tol
        # lm-eval's is_greedy: the likeliest entry of each top_logprobs is the token itself, or not.
        assert all(len(top) in (1, 2) for top in lp.top_logprobs[1:])
    with pytest.raises(openai.UnprocessableEntityError):  # 0 tokens without echo asks for nothing
        oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=0)
    plain = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=0, echo=True)
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None


def test_openai_streaming_logprobs_equal_the_whole_answer(oai):
    whole = oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=20, logprobs=2, echo=True,
                                   extra_body={"ignore_eos": True}).choices[0]
    chunks = list(oai.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=20, logprobs=2, echo=True,
                                         stream=True, extra_body={"ignore_eos": True}))
    pieces = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(p.text for p in pieces) == whole.text
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in pieces if p.logprobs for x in getattr(p.logprobs, name)] == getattr(whole.logprobs, name)

    kw = dict(model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=20, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True})
    chat = oai.chat.completions.create(**kw)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 20
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               and t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content)
    streamed = [t for ch in oai.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    no = oai.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert no.choices[0].logprobs is None


def test_generate_logprobs_shape_and_stream(client):
    body = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, "logprobs": 2, "prompt_logprobs": 1}
    r = client.post("/generate", json=body).json()
    assert len(r["logprobs"]) == 6 and all(len(e["top_logprobs"]) == 2 for e in r["logprobs"])
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == r["usage"]["prompt_tokens"]
    events = stream_events(client, "/generate", {**body, "stream": True})
    streamed = [e for ev in events for e in ev.get("logprobs") or []]
    assert streamed == r["logprobs"]
    assert [ev["prompt_logprobs"] for ev in events if "prompt_logprobs" in ev] == [r["prompt_logprobs"]]
    err = assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                 "top_logprobs": 2}), 422)
    assert "top_logprobs" in err["message"]
    # Scoring only: max_tokens 0 with prompt_logprobs gives the prompt's logprobs and no text.
    scored = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 0, "prompt_logprobs": 1}).json()
    assert scored["text"] == "" and scored["usage"]["completion_tokens"] == 0
    # The same prefill computation as above: equal up to float32 rounding of |logprob| < 20 (~1e-5; 1e-4 here).
    assert [e["token_id"] for e in scored["prompt_logprobs"][1:]] == [e["token_id"] for e in r["prompt_logprobs"][1:]]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4
               for a, b in zip(scored["prompt_logprobs"][1:], r["prompt_logprobs"][1:]))
    err = assert_error(client.post("/generate", json={"prompt": PROMPT, "max_tokens": 0}), 422)
    assert "prompt_logprobs" in err["message"]


def test_openai_n_parallel_samples(oai, client):
    """n = 3: three choices indexed 0..2, choice i equal to a lone request with seed + i, the prompt counted once
    in usage and the completions summed."""
    kw = dict(model="tiny-random", prompt=PROMPT, max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
    c = oai.completions.create(n=3, seed=5, **kw)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    alone = [oai.completions.create(seed=5 + i, **kw) for i in range(3)]
    assert [ch.text for ch in c.choices] == [a.choices[0].text for a in alone]
    assert len({ch.text for ch in c.choices}) == 3
    assert c.usage.prompt_tokens == alone[0].usage.prompt_tokens and c.usage.completion_tokens == 36
    assert c.usage.total_tokens == c.usage.prompt_tokens + 36
    streamed = ["", "", ""]
    for chunk in oai.completions.create(n=3, seed=5, stream=True, **kw):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [ch.text for ch in c.choices]

    chat_kw = dict(model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=10, n=3, seed=9,
                   temperature=1.0, logprobs=True, extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**chat_kw)
    assert [len(ch.logprobs.content) for ch in whole.choices] == [10, 10, 10]
    texts, finishes = ["", "", ""], [None] * 3
    chunks = list(oai.chat.completions.create(**chat_kw, stream=True, stream_options={"include_usage": True}))
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [ch.message.content for ch in whole.choices] and finishes == ["length"] * 3
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_is_bounded(client):
    err = assert_error(client.post("/v1/completions", json={"prompt": PROMPT, "n": 17}), 422)
    assert "'n'" in err["message"] and "16" in err["message"]


def read_then_leave(client, path: str, body: dict, events: int) -> None:
    """Reads `events` SSE events of a streamed request, then leaves: closing the half-read response closes the
    connection, which the server must take as the client gone."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == events:
                break


def test_disconnect_mid_stream_with_n_frees_every_sample(client):
    before = aborts(wait_idle(client))
    read_then_leave(client, "/v1/completions", {"prompt": PROMPT, **LONG, "n": 4, "stream": True}, 8)
    m = wait_idle(client)  # every block of every sample back
    assert aborts(m) == before + 4


def test_openai_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert e.value.body["code"] == "model_not_found"


def test_openai_wrong_key_is_401(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# --- every error, OpenAI-shaped ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"a string"'])
def test_400_body_is_not_a_json_object(client, content):
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")


@pytest.mark.parametrize("path,body,code", [
    ("/generate", {"prompt": "hi", "max_tokens": "ten"}, "invalid_type"),
    ("/generate", {"prompt": "hi", "max_tokens": 1.5}, "invalid_type"),
    ("/generate", {"prompt": "hi", "stream": "yes"}, "invalid_type"),
    ("/generate", {"prompt": "hi", "stop": 5}, "invalid_type"),
    ("/generate", {"max_tokens": 5}, "missing_field"),
    ("/generate", {"prompt": [["a"], ["b"]]}, "invalid_type"),
    ("/generate", {"prompt": "hi", "top_p": 5}, "invalid_value"),
    ("/generate", {"prompt": "hi", "temperature": -1}, "invalid_value"),
    ("/generate", {"prompt": "hi", "max_tokens": 0}, "invalid_value"),
    ("/generate", {"prompt": "hi", "seed": -1}, "invalid_value"),
    ("/generate", {"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "invalid_type"),
    ("/v1/completions", {"max_tokens": 3}, "missing_field"),
    ("/v1/chat/completions", {"messages": []}, "missing_field"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 5}, "invalid_value"),
])
def test_422_invalid_fields(client, path, body, code):
    err = assert_error(client.post(path, json=body), 422, code)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    {"prompt": "x" * 2000},               # 2000 byte tokens > the 1024-token context
    {"prompt": ""},                       # nothing to continue
    {"prompt": [5, 6, 99999]},            # a token id outside the vocabulary
])
def test_400_unusable_prompt(client, body):
    assert_error(client.post("/generate", json=body), 400, "invalid_prompt")
    assert_error(client.post("/v1/completions", json=body), 400, "invalid_prompt")


def test_401_missing_or_wrong_key_but_health_is_open(server):
    with httpx.Client(base_url=server.url, timeout=10) as anon:
        assert anon.get("/health").status_code == 200
        for path, method in (("/generate", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET"),
                             ("/v1/chat/completions", "POST")):
            body = {"prompt": "hi"} if method == "POST" else None
            assert_error(anon.request(method, path, json=body), 401, "invalid_api_key")
            assert_error(anon.request(method, path, json=body, headers={"Authorization": "Bearer nope"}), 401)
            assert_error(anon.request(method, path, json=body, headers={"Authorization": KEY}), 401)
        # The other accepted spelling of the key.
        assert anon.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200


def test_413_body_too_large(client):
    big = {"prompt": "x" * (BODY_LIMIT + 10)}
    assert_error(client.post("/generate", json=big), 413, "body_too_large")

    def chunked():  # no Content-Length: the limit must hold while the body is read
        for _ in range(BODY_LIMIT // 1000 + 5):
            yield b" " * 1000
    assert_error(client.post("/generate", content=chunked(), headers={"content-type": "application/json"}), 413,
                 "body_too_large")


def test_404_and_405(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.post("/v1/embeddings", json={"input": "hi"}), 404, "not_found")
    assert_error(client.post("/v1/completions", json={"model": "other", "prompt": "hi"}), 404, "model_not_found")
    assert_error(client.get("/generate"), 405, "method_not_allowed")


def test_error_answers_start_no_threads(server, client):
    """Every error kind is answered on the event loop: Starlette runs a plain-function exception handler in a
    thread pool, so a burst of errors would start a thread per concurrent error (and hop to it every time)."""
    threads = lambda: len(os.listdir(f"/proc/{server.pid}/task"))  # noqa: E731
    client.get("/nope")
    before = threads()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: [client.get("/nope"), client.get("/generate"), client.post("/generate", json=[]),
                                 client.post("/generate", content=b"x")], range(64)))
    assert threads() == before


@pytest.mark.parametrize("name", ["max_tokens", "temperature", "top_p", "n", "stream"])
def test_null_optional_fields_mean_default(client, name):
    r = client.post("/v1/completions", json={"prompt": PROMPT, name: None})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body", [
    ("/generate", '{"prompt": "a\\ud800b", "max_tokens": 3}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 3}'),
])
def test_unencodable_prompt_is_a_client_error(server, path, body):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), r.text
        assert_error(r, r.status_code)


# --- client disconnects free everything ------------------------------------------------------------------------

def test_disconnect_mid_stream_aborts_and_frees_kv(client):
    before = aborts(wait_idle(client))
    read_then_leave(client, "/generate", {"prompt": PROMPT, **LONG, "stream": True}, 3)
    m = wait_idle(client)
    assert aborts(m) == before + 1


async def test_disconnect_mid_non_stream_aborts_and_frees_kv(server, client):
    before = aborts(wait_idle(client))
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as ac:
        calls = [asyncio.ensure_future(ac.post("/generate", json={"prompt": f"{i} {PROMPT}", **LONG}, timeout=30))
                 for i in range(3)]
        await asyncio.sleep(0.2)
        scrape = await ac.get("/metrics")  # while they run
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    assert parse_metrics(scrape.text)[("jitney_requests_running", ())] > 0
    m = await asyncio.to_thread(wait_idle, client)
    assert aborts(m) >= before + 1


# --- /metrics ----------------------------------------------------------------------------------------------------

def test_metrics(server, client):
    client.post("/generate", json={"prompt": PROMPT, "max_tokens": 5})
    client.post("/generate", content=b"{", headers={"content-type": "application/json"})  # 400
    httpx.post(f"{server.url}/generate", json={"prompt": "hi"})                  # 401
    client.get("/nope")                                                          # 404
    client.post("/generate", content=b" " * (BODY_LIMIT + 1))                    # 413
    client.post("/generate", json={"prompt": "hi", "max_tokens": 0})             # 422
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = parse_metrics(r.text)
    names = {name for name, _ in m}
    for gauge in ("jitney_requests_waiting", "jitney_requests_running", "jitney_kv_cache_usage_ratio",
                  "jitney_kv_cache_blocks_used", "jitney_kv_cache_blocks_total"):
        assert gauge in names, gauge
    for counter in ("jitney_preemptions_total", "jitney_prompt_tokens_total", "jitney_generation_tokens_total",
                    "jitney_prefix_cache_queries_total", "jitney_prefix_cache_hits_total"):
        assert counter in names, counter
    # The configuration as info series (vLLM's cache_config_info), every label a string.
    cache = dict(next(labels for name, labels in m if name == "jitney_cache_config_info"))
    assert {"block_size", "num_blocks", "cache_dtype", "enable_prefix_caching"} <= set(cache)
    engine = dict(next(labels for name, labels in m if name == "jitney_engine_config_info"))
    assert engine["policy"] == "continuous" and int(engine["threads"]) >= 1
    for hist in ("jitney_queue_time_seconds", "jitney_time_to_first_token_seconds",
                 "jitney_inter_token_latency_seconds", "jitney_e2e_request_latency_seconds", "jitney_batch_size"):
        assert m[(f"{hist}_count", ())] > 0, hist
        assert (f"{hist}_bucket", (("le", "+Inf"),)) in m, hist
    assert 0 <= m[("jitney_kv_cache_usage_ratio", ())] <= 1
    assert m[("jitney_prompt_tokens_total", ())] > 0 and m[("jitney_generation_tokens_total", ())] > 0
    http: dict[str, float] = {}
    for (name, labels), v in m.items():
        if name == "jitney_http_requests_total":
            http[dict(labels)["status"]] = http.get(dict(labels)["status"], 0) + v
    for status in ("200", "400", "401", "404", "413", "422"):
        assert http.get(status, 0) > 0, (status, http)
    assert m[("jitney_http_requests_total", (("path", "/generate"), ("status", "200")))] > 0


def test_prompts_are_not_logged_but_requests_are(server, client):
    secret = "zebra-quokka-4242-do-not-log"
    r = client.post("/generate", json={"prompt": secret, "max_tokens": 4})
    assert r.status_code == 200
    access = re.compile(r'127\.0\.0\.1 "POST /generate" 200 \d+\.\dms prompt_tokens=%d' % len(secret))
    assert wait_until(lambda: access.search(server.output()), 5), server.output()[-2000:]
    assert secret not in server.output()


def test_still_serving_after_all_that(client, oai):
    wait_idle(client)
    r = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert oai.completions.create(model="tiny-random", prompt="hi", max_tokens=3).choices[0].finish_reason
    assert client.get("/health").json() == {"status": "ok"}


# --- servers with their own flags ------------------------------------------------------------------------------

async def test_429_overload_with_retry_after():
    with jitney_server(*TINY, "--max-queue", "2", "--max-num-seqs", "1", env=ENV) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            body = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}
            results = await asyncio.gather(*(ac.post("/generate", json=body) for _ in range(20)))
            statuses = sorted(r.status_code for r in results)
            assert set(statuses) == {200, 429}, statuses
            for r in results:
                if r.status_code == 429:
                    assert_error(r, 429, "overloaded")
                    assert int(r.headers["retry-after"]) >= 1
                else:  # nothing accepted is lost or cut short
                    assert r.json()["usage"]["completion_tokens"] == 300
                    assert r.json()["finish_reason"] == "length"
            # And once the burst is over, it serves again.
            assert (await ac.post("/generate", json={"prompt": "hi", "max_tokens": 3})).status_code == 200


async def test_504_queue_deadline():
    with jitney_server(*TINY, "--policy", "sequential", "--timeout-s", "0.2", env=ENV) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as ac:
            async with ac.stream("POST", "/generate", json={"prompt": PROMPT, **LONG, "stream": True}) as long:
                assert long.status_code == 200
                lines = long.aiter_lines()
                while not (await anext(lines)).startswith("data: "):  # the long request is running
                    pass
                waiting = {"prompt": "hi", "max_tokens": 5}
                plain, streamed = await asyncio.gather(ac.post("/generate", json=waiting),
                                                       ac.post("/generate", json={**waiting, "stream": True}))
                err = assert_error(plain, 504, "queue_timeout")
                assert err["type"] == "timeout"
                assert_error(streamed, 504, "queue_timeout")  # a stream that never started gets a status, too
                events = sse_events([line async for line in lines])
            assert events[-1]["finish_reason"] == "length"  # the running one was not disturbed
            r = await ac.post("/generate", json={"prompt": "hi", "max_tokens": 5})
            assert r.status_code == 200


def drain_streams(server, first, rest, n):
    """Streams in flight when SIGTERM arrives (under the sequential policy): one of body `first`, running, and
    n - 1 of body `rest` waiting behind it. The drain is checked as it goes (/health 503, new requests
    refused), then the exit code; returns every stream's status and events, the first one's first."""
    def one_stream(i, body):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/generate", json={"prompt": f"{i} {PROMPT}", **body, "stream": True}) as r:
                return r.status_code, sse_events(r.iter_lines())

    with httpx.Client(base_url=server.url, timeout=10) as c, concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one_stream, 0, first)]
        assert wait_until(lambda: metrics(c)[("jitney_requests_running", ())] == 1, 10)
        futures += [pool.submit(one_stream, i, rest) for i in range(1, n)]
        assert wait_until(lambda: metrics(c)[("jitney_requests_waiting", ())] >= n - 1, 10)
        server.signal(signal.SIGTERM)
        assert wait_until(lambda: c.get("/health").status_code == 503, 2), "/health should say 503 while draining"
        assert_error(c.post("/generate", json={"prompt": "hi", "max_tokens": 3}), 503, "shutting_down")
        code = server.proc.wait(timeout=60)
        results = [f.result(timeout=10) for f in futures]
    assert code == 0, server.output()[-2000:]
    assert "draining" in server.output()
    return results


def test_sigterm_lets_in_flight_requests_finish_then_exits_0():
    """Requests in flight when the signal comes run to their end inside the grace period, then the process
    exits 0: one long request (it holds the others in line) and seven that take four steps each, against 60 s
    of grace: however slow the machine."""
    with jitney_server(*TINY, "--policy", "sequential", "--grace-s", "60", env=ENV) as server:
        results = drain_streams(server, LONG, {"max_tokens": 4, "ignore_eos": True}, 8)
    for i, (status, events) in enumerate(results):
        assert status == 200
        assert events[-1]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == (900 if i == 0 else 4)


def test_sigterm_cuts_what_the_grace_period_cannot_hold():
    """With no grace at all, requests still running or waiting are cut, each told so by a final error event
    after an "abort" finish, and the process exits 0. One at a time (sequential), eight 900-token requests
    cannot all be done the moment the signal lands, on any machine; one may have finished just before."""
    with jitney_server(*TINY, "--policy", "sequential", "--grace-s", "0", env=ENV) as server:
        results = drain_streams(server, LONG, LONG, 8)
    aborted = 0
    for status, events in results:
        assert status == 200
        if "error" in events[-1]:
            assert events[-1]["error"]["code"] == "shutting_down"
            assert events[-2]["finish_reason"] == "abort"
            aborted += 1
        else:
            assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 900
    assert aborted >= 7, aborted


def test_second_sigterm_exits_at_once():
    with jitney_server(*TINY, "--max-num-seqs", "1", "--grace-s", "30", env=ENV) as server:

        def one_stream(i):
            with httpx.Client(base_url=server.url, timeout=30) as c:
                with c.stream("POST", "/generate", json={"prompt": f"{i} {PROMPT}", **LONG, "stream": True}) as r:
                    return sse_events(r.iter_lines())

        with httpx.Client(base_url=server.url, timeout=10) as c, concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one_stream, i) for i in range(6)]  # three seconds of work, one at a time
            # All six accepted (one running, five waiting) before the signal: a later one would get a 503 instead.
            assert wait_until(lambda: metrics(c)[("jitney_requests_waiting", ())] >= 5, 10)
            server.signal(signal.SIGTERM)
            assert wait_until(lambda: c.get("/health").status_code == 503, 2)
            t0 = time.monotonic()
            server.signal(signal.SIGTERM)
            server.proc.wait(timeout=15)
            elapsed = time.monotonic() - t0
            for f in futures:
                with contextlib.suppress(httpx.TransportError):
                    f.result(timeout=10)
        assert elapsed < 5.0, f"took {elapsed:.1f}s to exit after the second signal (grace is 30 s)"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")
def test_https_and_log_requests(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with jitney_server(*TINY, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--log-requests",
                       env=ENV, https=True) as server:
        assert server.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=server.url, verify=ctx, timeout=10) as c:
            assert c.get("/health").status_code == 200
            secret = "pelican-7731-logged-on-request"
            r = c.post("/generate", json={"prompt": secret, "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port gets nowhere
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=3)
        # --log-requests is what turns prompt logging on.
        assert wait_until(lambda: secret in server.output(), 5)
