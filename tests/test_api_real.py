"""The HTTP API on the real default model (SmolLM2-135M, float32): what the server says over HTTP is exactly what
the model says in-process, and the chat route answers sensibly."""
import httpx
import openai
import pytest

from batcher.generate import generate
from model_runner.sampling_params import SamplingParams

from .server_helpers import ServerProcess

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def real(request):
    """(server, in-process runner): the server boots in its subprocess while the runner loads here."""
    server = ServerProcess("--dtype", "float32", "--kv-cache-memory", "128MiB", model=MODEL)
    server.start()
    try:
        runner = request.getfixturevalue("smol_runner")
        server.wait_ready(120)
        yield server, runner
    finally:
        server.close()


@pytest.fixture(scope="module")
def expected(real):
    """Greedy continuation of each prompt, run alone in-process: (text, completion tokens, finish reason)."""
    _, runner = real
    out = []
    for prompt in PROMPTS:
        ids = runner.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        seq = generate(runner, [ids], SamplingParams(max_tokens=MAX_TOKENS))[0]
        text = runner.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
        out.append((text, seq.num_output_tokens, seq.finish_reason.finish_reason))
    return out


def test_generate_matches_in_process_greedy(real, expected):
    server, _ = real
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for prompt, (text, n, reason) in zip(PROMPTS, expected):
            body = c.post("/generate", json={"prompt": prompt, "max_tokens": MAX_TOKENS}).json()
            assert (body["text"], body["usage"]["completion_tokens"], body["finish_reason"]) == (text, n, reason)


def test_completions_match_in_process_greedy(real, expected):
    server, _ = real
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        for prompt, (text, n, reason) in zip(PROMPTS, expected):
            c = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            assert (c.choices[0].text, c.usage.completion_tokens, c.choices[0].finish_reason) == (text, n, reason)


def test_chat_knows_the_capital_of_france(real):
    server, _ = real
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        c = oai.chat.completions.create(model=MODEL, max_tokens=30,
                                        messages=[{"role": "user", "content": "What is the capital of France?"}])
        answer = c.choices[0].message.content
        assert "Paris" in answer, answer
        # The streamed answer is the same text, delta by delta.
        chunks = oai.chat.completions.create(model=MODEL, max_tokens=30, stream=True,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answer


CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population_millions"],
        "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                       "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}}}


def test_json_schema_output_parses_and_matches_through_the_openai_client(real):
    """response_format json_schema on the real model: greedy, and n = 3 sampled samples (each with its own
    matcher), each output parses and matches; the client's own parse() with a pydantic model too."""
    import json

    import jsonschema
    import pydantic

    server, _ = real
    messages = [{"role": "user", "content": "Describe the capital of France as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as oai:
        greedy = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, response_format=fmt)
        sampled = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, response_format=fmt,
                                              temperature=1.0, seed=7, n=3)
        for choice in greedy.choices + sampled.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), CITY)
        assert greedy.usage.prompt_tokens == sampled.usage.prompt_tokens  # n = 3 counts its prompt once

        class Capital(pydantic.BaseModel):
            city: str = pydantic.Field(max_length=40)
            is_capital: bool

        parsed = oai.chat.completions.parse(model=MODEL, messages=messages, max_tokens=60, response_format=Capital)
        assert isinstance(parsed.choices[0].message.parsed, Capital)
        completion = oai.completions.create(model=MODEL, prompt="A JSON object about Paris: ", max_tokens=80,
                                            extra_body={"response_format": {"type": "json_object"}})
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(completion.choices[0].text), dict)
