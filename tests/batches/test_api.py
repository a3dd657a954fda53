"""The Batch API in process, on a real SQLite store and the real Redis broker: a batch is
validated line by line when it is created (a bad line fails it, naming the line, and nothing
is queued), every object validates as the official openai client's `Batch` and strictly as OpenAI's
schema has it, every refused parameter answers in OpenAI's error shape naming it (an input
file over `batches.max_file_bytes` too), and another tenant's batch is missing."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai.types import Batch
from redis.asyncio import Redis

from llmops.settings import Settings
from tests.conformance import assert_conforms
from tests.databases import REDIS_URL, in_process_gateway
from workers.app import BATCH_QUEUE

ADMIN = "sk-unit-batches"
URL = "/v1/chat/completions"


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": URL,
            "body": body or {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        batches={"max_lines": 5, "max_active": 2, "max_file_bytes": 1024},
                        models=[{"name": "chat", "kind": "chat", "pools": [
                            {"device": "cpu", "urls": ["http://127.0.0.1:9"]}]}])
    async with in_process_gateway(settings, ADMIN) as client:
        yield client, settings


async def member(client: httpx.AsyncClient) -> dict[str, str]:
    tenant = await client.post("/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}"})
    key = await client.post("/admin/keys", json={"tenant_id": tenant.json()["id"]})
    return {"authorization": f"Bearer {key.json()['key']}"}


async def upload(client: httpx.AsyncClient, headers: dict[str, str],
                 lines: list[dict[str, Any]] | bytes, purpose: str = "batch") -> str:
    data = lines if isinstance(lines, bytes) else b"".join(
        orjson.dumps(x) + b"\n" for x in lines)
    resp = await client.post("/v1/files", headers=headers, data={"purpose": purpose},
                             files={"file": ("in.jsonl", data)})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


async def queued(settings: Settings) -> list[str]:
    redis = Redis.from_url(REDIS_URL)
    raw = await redis.lrange(f"{settings.redis_prefix}:celery:{BATCH_QUEUE}", 0, -1)
    await redis.aclose()
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw]


def refused(resp: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return error


async def test_a_good_file_makes_a_queued_batch_in_openais_shape(
        api: tuple[httpx.AsyncClient, Settings]) -> None:
    client, settings = api
    me = await member(client)
    file_id = await upload(client, me, [line("a"), line("b")])
    resp = await client.post("/v1/batches", headers=me, json={
        "input_file_id": file_id, "endpoint": URL, "completion_window": "24h",
        "metadata": {"job": "nightly"}})
    assert resp.status_code == 200, resp.text
    assert_conforms(resp.json(), "Batch")  # what has no value yet is left out, never null
    batch = Batch.model_validate(resp.json())
    assert batch.status == "validating" and batch.errors is None
    assert batch.request_counts is not None and batch.request_counts.total == 2
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.metadata == {"job": "nightly"}
    assert await queued(settings) == [batch.id]
    got = (await client.get(f"/v1/batches/{batch.id}", headers=me)).json()
    assert_conforms(got, "Batch")
    assert Batch.model_validate(got).id == batch.id


async def test_bad_lines_fail_the_batch_with_their_line_numbers_and_nothing_runs(
        api: tuple[httpx.AsyncClient, Settings]) -> None:
    client, settings = api
    me = await member(client)
    file_id = await upload(client, me, b"\n".join([
        orjson.dumps(line("a")), b"{oops", orjson.dumps(line("a")),
        orjson.dumps(line("c", model="gpt-none", messages=[{"role": "user", "content": "x"}])),
    ]))
    resp = await client.post("/v1/batches", headers=me, json={
        "input_file_id": file_id, "endpoint": URL, "completion_window": "24h"})
    assert_conforms(resp.json(), "Batch")
    batch = Batch.model_validate(resp.json())
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.object == "list"
    assert [(e.line, e.code, e.param) for e in batch.errors.data or []] == [
        (2, "invalid_json_line", None), (3, "duplicate_custom_id", "custom_id"),
        (4, "model_not_found", "body.model")]
    assert await queued(settings) == []
    refused(await client.post(f"/v1/batches/{batch.id}/cancel", headers=me), 400, "batch_id")


async def test_every_bad_parameter_names_itself(
        api: tuple[httpx.AsyncClient, Settings]) -> None:
    client, _ = api
    me = await member(client)
    good = await upload(client, me, [line("a")])
    tuning = await upload(client, me, [line("a")], purpose="fine-tune")
    too_many = await upload(client, me, [line(str(i)) for i in range(6)])
    empty = await upload(client, me, b"\n\n")
    body = {"input_file_id": good, "endpoint": URL, "completion_window": "24h"}
    cases: list[tuple[dict[str, Any], int, str]] = [
            ({"endpoint": "/v1/images"}, 400, "endpoint"),
            ({"completion_window": "1h"}, 400, "completion_window"),
            ({"input_file_id": "file-missing"}, 404, "input_file_id"),
            ({"input_file_id": tuning}, 400, "input_file_id"),
            ({"input_file_id": too_many}, 400, "input_file_id"),
            ({"input_file_id": empty}, 400, "input_file_id"),
            ({"metadata": {"k": "v" * 600}}, 400, "metadata.k"),
            ({"color": "blue"}, 400, "color")]
    for change, status, param in cases:
        refused(await client.post("/v1/batches", headers=me, json={**body, **change}),
                status, param)
    refused(await client.post("/v1/batches", headers=me, json={"endpoint": URL,
                                                              "completion_window": "24h"}),
            400, "input_file_id")
    refused(await client.get("/v1/batches/batch_nope", headers=me), 404, "batch_id")
    refused(await client.post("/v1/batches/batch_nope/cancel", headers=me), 404, "batch_id")
    refused(await client.get("/v1/batches?limit=0", headers=me), 400, "limit")
    refused(await client.get("/v1/batches?after=batch_nope", headers=me), 404, "after")
    # Output files are written by workers only.
    refused(await client.post("/v1/files", headers=me, data={"purpose": "batch_output"},
                              files={"file": ("x.jsonl", b"{}")}), 400, "purpose")


async def test_an_input_file_over_the_size_limit_is_refused_naming_it(
        api: tuple[httpx.AsyncClient, Settings]) -> None:
    client, settings = api
    me = await member(client)

    def sized(size: int) -> bytes:
        """One good line of exactly `size` bytes, its newline included."""
        empty = len(orjson.dumps(line("a", model="chat", messages=[
            {"role": "user", "content": ""}]))) + 1
        return orjson.dumps(line("a", model="chat", messages=[
            {"role": "user", "content": "x" * (size - empty)}])) + b"\n"

    limit = settings.batches.max_file_bytes
    at, over = await upload(client, me, sized(limit)), await upload(client, me, sized(limit + 1))
    body = {"endpoint": URL, "completion_window": "24h"}
    error = refused(await client.post("/v1/batches", headers=me,
                                      json={**body, "input_file_id": over}),
                    400, "input_file_id")
    assert error["type"] == "invalid_request_error"
    assert over in error["message"] and str(limit) in error["message"]
    assert (await client.get("/v1/batches", headers=me)).json()["data"] == []
    assert await queued(settings) == []
    # A file of exactly the limit is taken.
    taken = await client.post("/v1/batches", headers=me, json={**body, "input_file_id": at})
    assert taken.status_code == 200, taken.text
    assert await queued(settings) == [taken.json()["id"]]


async def test_listing_pages_and_tenants_are_apart(
        api: tuple[httpx.AsyncClient, Settings]) -> None:
    client, _ = api
    me, other = await member(client), await member(client)
    file_id = await upload(client, me, [line("a")])
    ids = []
    for _ in range(2):
        resp = await client.post("/v1/batches", headers=me, json={
            "input_file_id": file_id, "endpoint": URL, "completion_window": "24h"})
        ids.append(resp.json()["id"])
    # Two batches in progress are this tenant's most.
    error = refused(await client.post("/v1/batches", headers=me, json={
        "input_file_id": file_id, "endpoint": URL, "completion_window": "24h"}), 429, None)
    assert error["code"] == "too_many_batches"
    first = (await client.get("/v1/batches?limit=1", headers=me)).json()
    assert_conforms(first, "ListBatchesResponse")
    assert [b["id"] for b in first["data"]] == [ids[1]] and first["has_more"]
    rest = (await client.get(f"/v1/batches?limit=1&after={first['last_id']}",
                             headers=me)).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and not rest["has_more"]
    # Another tenant sees none of it: not the batch, not its input file.
    empty = (await client.get("/v1/batches", headers=other)).json()
    assert_conforms(empty, "ListBatchesResponse")
    assert empty["data"] == []
    for path in (f"/v1/batches/{ids[0]}", f"/v1/files/{file_id}"):
        assert (await client.get(path, headers=other)).status_code == 404
    refused(await client.post(f"/v1/batches/{ids[0]}/cancel", headers=other), 404, "batch_id")
    refused(await client.post("/v1/batches", headers=other, json={
        "input_file_id": file_id, "endpoint": URL, "completion_window": "24h"}),
        404, "input_file_id")
    cancelled = (await client.post(f"/v1/batches/{ids[0]}/cancel", headers=me)).json()
    assert_conforms(cancelled, "Batch")
    assert Batch.model_validate(cancelled).status == "cancelling"
