"""Every object the gateway answers without an engine validates strictly against OpenAI's
published schema (tests/conformance.py): models, files, fine-tuning jobs, events and
checkpoints, vector stores and their files, evals, runs and output items, and errors; and the
engine's answers, as vLLM shapes them, leave the answer hooks conforming (the engine here is
the answer's bytes: the real engine's are checked in tests/e2e/test_conformance.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from evals.store import Evals, ItemOutcome
from finetune.jobs import FineTuning
from gateway.inference.hooks import CHANGED, KEEP, ConformanceHook
from llmops.settings import Settings
from llmops.store import Database
from tests.conformance import DOCUMENT, assert_conforms
from tests.databases import in_process_gateway
from tests.gateway.test_evals_api import EVAL, WIRE_SAMPLE
from tests.standin import serve_engine

ADMIN = "sk-unit-conformance"
Api = tuple[httpx.AsyncClient, Settings]

# What vLLM 0.32 sends (its response models' `model_dump()`; a stream chunk's
# `model_dump_json(exclude_unset=True)`), nulls and extra fields included.
USAGE = {"prompt_tokens": 9, "total_tokens": 16, "completion_tokens": 7,
         "prompt_tokens_details": None, "completion_tokens_details": None}
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "Paris.", "refusal": None, "annotations": None,
            "audio": None, "function_call": None, "reasoning": None},
            "logprobs": None, "finish_reason": "stop", "stop_reason": None, "token_ids": None,
            "routed_experts": None}],
        "service_tier": None, "system_fingerprint": None, "usage": USAGE,
        "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": " Paris.", "logprobs": None,
                           "finish_reason": "length", "stop_reason": None, "token_ids": None,
                           "prompt_logprobs": None, "prompt_token_ids": None,
                           "routed_experts": None}],
              "service_tier": None, "system_fingerprint": None, "usage": USAGE,
              "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
EMBEDDING = {"id": "embd-1", "object": "list", "created": 1, "model": "e",
             "data": [{"index": 0, "object": "embedding", "embedding": [0.1, 0.2]}],
             "usage": {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0,
                       "prompt_tokens_details": None, "completion_tokens_details": None}}
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "Par"}, "logprobs": None,
                      "finish_reason": None}],
         "usage": {"prompt_tokens": 9, "total_tokens": 10, "completion_tokens": 1}}


def normalised(answer: dict[str, Any], whole: bool) -> tuple[int, dict[str, Any]]:
    data = orjson.loads(orjson.dumps(answer))
    return ConformanceHook().on_data(None, data, whole), data  # type: ignore[arg-type]


@pytest.mark.parametrize(("answer", "schema"), [
    (CHAT, "CreateChatCompletionResponse"), (COMPLETION, "CreateCompletionResponse")])
def test_engine_answers_conform_once_normalised(answer: dict[str, Any], schema: str) -> None:
    with pytest.raises(AssertionError, match="system_fingerprint: None"):
        assert_conforms(answer, schema)  # as vLLM sends it
    verdict, data = normalised(answer, whole=True)
    assert verdict == CHANGED
    assert_conforms(data, schema)
    # Only the nulls OpenAI has no room for went; the engine's own fields stay.
    assert data["choices"][0]["stop_reason"] is None and data["service_tier"] is None
    assert "system_fingerprint" not in data and "prompt_tokens_details" not in data["usage"]


def test_embeddings_conform_and_lose_null_usage_details() -> None:
    """OpenAI's embedding usage is open: vLLM's null details are extras there, yet typed
    clients sharing one usage type with chat would trip on them."""
    assert_conforms(EMBEDDING, "CreateEmbeddingResponse")
    verdict, data = normalised(EMBEDDING, whole=True)
    assert verdict == CHANGED and data["usage"] == {"prompt_tokens": 3, "total_tokens": 3,
                                                    "completion_tokens": 0}
    assert_conforms(data, "CreateEmbeddingResponse")


def test_a_chunk_with_nothing_to_drop_is_kept_as_it_came() -> None:
    assert_conforms(CHUNK, "CreateChatCompletionStreamResponse")
    verdict, data = normalised(CHUNK, whole=False)
    assert verdict == KEEP and data == CHUNK
    assert normalised({**CHUNK, "usage": None}, whole=False)[0] == KEEP  # null is allowed


def test_streamed_nulls_are_dropped() -> None:
    chunk = {**CHUNK, "system_fingerprint": None, "usage": USAGE, "choices": [{
        "index": 0, "finish_reason": None, "delta": {
            "role": None, "content": None, "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": None}}]}}]}
    verdict, data = normalised(chunk, whole=False)
    assert verdict == CHANGED
    assert_conforms(data, "CreateChatCompletionStreamResponse")
    assert data["choices"][0]["delta"] == {"content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]}


async def vllm_shaped(request: web.Request) -> web.StreamResponse:
    """vLLM's answers: whole, streamed, or its refusal of a too long answer."""
    body = await request.json()
    if body.get("max_tokens", 0) > 2048:
        return web.json_response({"error": {
            "message": "max_tokens=4096 cannot be greater than max_model_len=2048.",
            "type": "BadRequestError", "param": "max_tokens", "code": 400}}, status=400)
    if not body.get("stream"):
        return web.json_response(CHAT)
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for chunk in ({**CHUNK, "system_fingerprint": None},
                  {**CHUNK, "choices": [{**CHUNK["choices"][0], "finish_reason": "stop"}]},
                  {**CHUNK, "choices": [], "usage": USAGE}):
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def test_the_gateway_answers_a_vllm_shaped_engine_in_openais_shape(tmp_path: Path
                                                                       ) -> None:
    async with serve_engine(vllm_shaped) as url:
        settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                            redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                            files={"root": tmp_path / "files"},
                            ledger={"spool_path": tmp_path / "spool"},
                            models=[{"name": "m", "kind": "chat",
                                     "pools": [{"device": "cpu", "urls": [url]}]}])
        async with in_process_gateway(settings, ADMIN) as client:
            ask = {"model": "m", "messages": [{"role": "user", "content": "France?"}]}
            await ok(client.post("/v1/chat/completions", json=ask),
                     "CreateChatCompletionResponse")
            resp = await client.post("/v1/chat/completions", json={
                **ask, "stream": True, "stream_options": {"include_usage": True}})
            chunks = [orjson.loads(line[6:]) for line in resp.text.split("\n")
                      if line.startswith("data: {")]
            assert len(chunks) == 3 and resp.text.endswith("data: [DONE]\n\n")
            for chunk in chunks:
                assert_conforms(chunk, "CreateChatCompletionStreamResponse")
            refused = await client.post("/v1/chat/completions", json={**ask, "max_tokens": 4096})
            assert refused.status_code == 400
            assert_conforms(refused.json(), "ErrorResponse")
            assert refused.json()["error"]["param"] == "max_tokens"
            assert refused.json()["error"]["code"] is None  # vLLM's code is the HTTP status


def nulls(schema: dict[str, Any]) -> dict[str, None]:
    """Every optional property of `schema`, as null."""
    return {name: None for name in schema["properties"] if name not in schema.get("required", ())}


def test_every_optional_property_the_schema_keeps_from_null_is_dropped() -> None:
    """Against the vendored schema itself, so that a newer schema with more such properties
    fails here: each optional property of the engines' objects is sent as null; what may not
    be null must go, what may stays."""
    schemas = orjson.loads(DOCUMENT.read_bytes())["components"]["schemas"]
    usage = schemas["CompletionUsage"]
    details = {name: nulls(usage["properties"][name]) for name in
               ("prompt_tokens_details", "completion_tokens_details")}
    message = {**CHAT["choices"][0]["message"],  # type: ignore[index]
               **nulls(schemas["ChatCompletionResponseMessage"])}
    chat = {**CHAT, **nulls(schemas["CreateChatCompletionResponse"]),
            "choices": [{**CHAT["choices"][0], "message": message}]}  # type: ignore[index]
    completion = {**COMPLETION, **nulls(schemas["CreateCompletionResponse"])}
    call = schemas["ChatCompletionMessageToolCallChunk"]
    delta = {**nulls(schemas["ChatCompletionStreamResponseDelta"]), "tool_calls": [
        {"index": 0, **nulls(call), "function": nulls(call["properties"]["function"])}]}
    chunk = {**CHUNK, **nulls(schemas["CreateChatCompletionStreamResponse"]),
             "choices": [{**CHUNK["choices"][0], "delta": delta}]}  # type: ignore[index]
    with_usage = {**CHUNK, "usage": {**CHUNK["usage"], **details}}  # type: ignore[dict-item]
    for answer, whole, schema in ((chat, True, "CreateChatCompletionResponse"),
                                  ({**chat, "usage": {**USAGE, **details}}, True,
                                   "CreateChatCompletionResponse"),
                                  (completion, True, "CreateCompletionResponse"),
                                  (chunk, False, "CreateChatCompletionStreamResponse"),
                                  (with_usage, False, "CreateChatCompletionStreamResponse")):
        with pytest.raises(AssertionError):
            assert_conforms(answer, schema)
        assert normalised(answer, whole)[0] == CHANGED
        assert_conforms(normalised(answer, whole)[1], schema)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    dead = "http://127.0.0.1:9"  # nothing here calls an engine
    settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        retrieval={"path": tmp_path / "qdrant"},
                        models=[{"name": "chat", "kind": "chat", "weights": str(tmp_path),
                                 "pools": [{"device": "cpu", "urls": [dead]}]},
                                {"name": "embed", "kind": "embedding",
                                 "pools": [{"device": "cpu", "urls": [dead]}]}])
    async with in_process_gateway(settings, ADMIN) as client:
        yield client, settings


async def ok(resp: httpx.Response | Any, schema: str) -> dict[str, Any]:
    resp = await resp
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert_conforms(body, schema)
    return body


async def test_models_and_errors(api: Api) -> None:
    client, _ = api
    listed = await ok(client.get("/v1/models"), "ListModelsResponse")
    assert {m["id"]: m["kind"] for m in listed["data"]} == {"chat": "chat", "embed": "embedding"}
    assert (await ok(client.get("/v1/models/chat"), "Model"))["kind"] == "chat"
    for resp in (await client.get("/v1/models/nope"), await client.get("/v1/files/file-nope"),
                 await client.post("/v1/vector_stores", json={"name": 3}),
                 await client.get("/v1/files", headers={"authorization": "Bearer sk-wrong"})):
        assert resp.status_code in (400, 401, 404)
        assert_conforms(resp.json(), "ErrorResponse")


async def test_files(api: Api) -> None:
    client, _ = api
    empty = await ok(client.get("/v1/files"), "ListFilesResponse")
    assert empty["data"] == [] and empty["first_id"] == empty["last_id"] == ""
    line = b'{"messages": [{"role": "user", "content": "Hi"}, ' \
           b'{"role": "assistant", "content": "Hello"}]}\n'
    file = await ok(client.post("/v1/files", data={"purpose": "fine-tune"},
                                files={"file": ("train.jsonl", line)}), "OpenAIFile")
    assert "expires_at" not in file and "status_details" not in file
    await ok(client.get(f"/v1/files/{file['id']}"), "OpenAIFile")
    listed = await ok(client.get("/v1/files"), "ListFilesResponse")
    assert listed["first_id"] == listed["last_id"] == file["id"]
    await ok(client.delete(f"/v1/files/{file['id']}"), "DeleteFileResponse")


async def test_fine_tuning(api: Api) -> None:
    client, settings = api
    await ok(client.get("/v1/fine_tuning/jobs"), "ListPaginatedFineTuningJobsResponse")
    line = b'{"messages": [{"role": "user", "content": "Hi"}, ' \
           b'{"role": "assistant", "content": "Hello"}]}\n'
    file = (await client.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("train.jsonl", line)})).json()
    job = await ok(client.post("/v1/fine_tuning/jobs", json={
        "model": "chat", "training_file": file["id"], "suffix": "unit",
        "hyperparameters": {"n_epochs": 2}}), "FineTuningJob")
    db = Database(settings.database_url)  # what the worker records, through the store
    try:
        jobs = FineTuning(db)
        await jobs.event(job["id"], "Step 1/2: training loss=1.5", type_="metrics",
                         data={"step": 1, "total_steps": 2, "train_loss": 1.5})
        await jobs.checkpoint(job["id"], 1, {"train_loss": 1.5})
    finally:
        await db.close()
    events = await ok(client.get(f"/v1/fine_tuning/jobs/{job['id']}/events"),
                      "ListFineTuningJobEventsResponse")
    created, metrics = events["data"][1], events["data"][0]
    assert "data" not in created and metrics["data"]["train_loss"] == 1.5
    await ok(client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"),
             "ListFineTuningJobCheckpointsResponse")
    await ok(client.get(f"/v1/fine_tuning/jobs/{job['id']}"), "FineTuningJob")
    await ok(client.get("/v1/fine_tuning/jobs"), "ListPaginatedFineTuningJobsResponse")
    await ok(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), "FineTuningJob")


async def test_dpo_fine_tuning_job(api: Api) -> None:
    """A DPO job in OpenAI's shape: its method and hyperparameters (beta too) come back as
    given, "auto" as the defaults; out-of-range values are refused naming the field."""
    client, _ = api
    line = b'{"input": {"messages": [{"role": "user", "content": "Hi"}]}, ' \
           b'"preferred_output": [{"role": "assistant", "content": "Hello!"}], ' \
           b'"non_preferred_output": [{"role": "assistant", "content": "Go away."}]}\n'
    file = (await client.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("prefs.jsonl", line)})).json()
    body = {"model": "chat", "training_file": file["id"]}
    job = await ok(client.post("/v1/fine_tuning/jobs", json={**body, "method": {
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2,
                                                   "batch_size": "auto"}}}}), "FineTuningJob")
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.25, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}}}
    default = await ok(client.post("/v1/fine_tuning/jobs", json={**body, "method": {
        "type": "dpo"}}), "FineTuningJob")
    assert default["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    retrieved = await ok(client.get(f"/v1/fine_tuning/jobs/{job['id']}"), "FineTuningJob")
    assert retrieved["method"] == job["method"]

    for method, param in (
            ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}},
             "method.dpo.hyperparameters.beta"),
            ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}},
             "method.dpo.hyperparameters.beta"),
            ({"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}},
             "method.dpo.hyperparameters.n_epochs"),
            ({"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 999}}},
             "method.supervised.hyperparameters.batch_size"),
            ({"type": "dpo", "supervised": {}}, "method.supervised"),
            ({"type": "reinforcement"}, "method.type")):
        refused = await client.post("/v1/fine_tuning/jobs", json={**body, "method": method})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error


async def test_vector_stores(api: Api) -> None:
    client, _ = api
    await ok(client.get("/v1/vector_stores"), "ListVectorStoresResponse")
    unnamed = await ok(client.post("/v1/vector_stores", json={}), "VectorStoreObject")
    assert unnamed["name"] == "" and "expires_after" not in unnamed
    file = (await client.post("/v1/files", data={"purpose": "assistants"},
                              files={"file": ("kettle.txt", b"A seven-year warranty.")})).json()
    store = await ok(client.post("/v1/vector_stores", json={
        "name": "manuals", "file_ids": [file["id"]], "metadata": {"team": "a"}}),
        "VectorStoreObject")
    sid = store["id"]
    await ok(client.get(f"/v1/vector_stores/{sid}"), "VectorStoreObject")
    await ok(client.post(f"/v1/vector_stores/{sid}", json={"name": "renamed"}),
             "VectorStoreObject")
    await ok(client.get("/v1/vector_stores"), "ListVectorStoresResponse")
    await ok(client.post(f"/v1/vector_stores/{unnamed['id']}/files", json={
        "file_id": file["id"], "attributes": {"year": 2024}}), "VectorStoreFileObject")
    await ok(client.get(f"/v1/vector_stores/{sid}/files"), "ListVectorStoreFilesResponse")
    await ok(client.get(f"/v1/vector_stores/{sid}/files/{file['id']}"),
             "VectorStoreFileObject")
    await ok(client.delete(f"/v1/vector_stores/{sid}/files/{file['id']}"),
             "DeleteVectorStoreFileResponse")
    await ok(client.delete(f"/v1/vector_stores/{sid}"), "DeleteVectorStoreResponse")


async def test_evals(api: Api) -> None:
    client, settings = api
    await ok(client.get("/v1/evals"), "EvalList")
    ev = await ok(client.post("/v1/evals", json=EVAL), "Eval")
    await ok(client.get(f"/v1/evals/{ev['id']}"), "Eval")
    await ok(client.post(f"/v1/evals/{ev['id']}", json={"name": "renamed"}), "Eval")
    await ok(client.get("/v1/evals"), "EvalList")
    runs = f"/v1/evals/{ev['id']}/runs"
    await ok(client.get(runs), "EvalRunList")
    run = await ok(client.post(runs, json={"name": "r", "data_source": {
        "type": "jsonl", "source": {"type": "file_content", "content": [
            {"item": {"q": "France?", "a": "Paris"}, "sample": {"output_text": "Paris"}}]}}}),
        "EvalRun")
    db = Database(settings.database_url)  # what a worker records, through the store
    try:
        evals = Evals(db)
        assert await evals.claim(run["id"], "w", 60)
        assert await evals.record(run["id"], "w", ItemOutcome(
            0, {"q": "France?", "a": "Paris"}, WIRE_SAMPLE,
            [{"name": "exact", "type": "string_check", "passed": True, "score": 1.0,
              "sample": None, "error": None, "detail": {}}], "pass",
            {"chat": {"invocation_count": 1, "prompt_tokens": 3, "completion_tokens": 1,
                      "total_tokens": 4, "cached_tokens": 0}}))
    finally:
        await db.close()
    await ok(client.get(f"{runs}/{run['id']}"), "EvalRun")
    await ok(client.get(runs), "EvalRunList")
    items = await ok(client.get(f"{runs}/{run['id']}/output_items"), "EvalRunOutputItemList")
    await ok(client.get(f"{runs}/{run['id']}/output_items/{items['data'][0]['id']}"),
             "EvalRunOutputItem")
    second = (await client.post(runs, json={"data_source": run["data_source"]})).json()
    await ok(client.post(f"{runs}/{second['id']}"), "EvalRun")  # cancelled
    await ok(client.delete(f"{runs}/{run['id']}"), "DELETE /evals/{eval_id}/runs/{run_id}")
    await ok(client.delete(f"/v1/evals/{ev['id']}"), "DELETE /evals/{eval_id}")
