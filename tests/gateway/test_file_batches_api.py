"""Vector store file batches in process (real SQLite store, embedded vector index, real Redis
broker, no worker: the test moves files along as a worker would, through the store): every
object validates as the official openai client's own type and strictly as OpenAI's schema
has it, a refused request leaves nothing
behind, files are attached for the calling key, and the status follows the files through
completion, failure and cancelling."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.vector_stores import VectorStoreFile, VectorStoreFileBatch
from redis.asyncio import Redis
from sqlalchemy import select

from gateway.app import create_app, services_of
from llmops.settings import Settings
from llmops.store import Database
from llmops.store import VectorStoreFile as VectorStoreFileRow
from llmops.store import VectorStoreFileBatch as VectorStoreFileBatchRow
from retrieval.stores import VectorStores
from tests.conformance import assert_conforms
from tests.databases import REDIS_URL, in_process_gateway
from tests.gateway.test_queueing import sent
from workers.app import INGEST_QUEUE

ADMIN = "sk-unit-file-batches"
DEAD = "http://127.0.0.1:9"  # no engine is called


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Settings, Any]]:
    settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        redis_url=REDIS_URL, redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        retrieval={"path": tmp_path / "qdrant", "max_batch_files": 3},
                        models=[{"name": "embed", "kind": "embedding",
                                 "pools": [{"device": "cpu", "urls": [DEAD]}]}])
    app = create_app(settings)
    async with in_process_gateway(settings, ADMIN, app) as client:
        yield client, settings, app


async def member(client: httpx.AsyncClient) -> tuple[dict[str, str], str]:
    """Headers of a new member tenant's key, and the key's id."""
    tenant = await client.post("/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:6]}"})
    key = (await client.post("/admin/keys", json={"tenant_id": tenant.json()["id"]})).json()
    return {"authorization": f"Bearer {key['key']}"}, key["id"]


async def upload(client: httpx.AsyncClient, headers: dict[str, str], n: int) -> list[str]:
    return [(await client.post("/v1/files", headers=headers, data={"purpose": "assistants"},
                               files={"file": (f"doc{i}.txt", f"Document {i}.".encode())})
             ).json()["id"] for i in range(n)]


async def as_worker(settings: Settings, store_id: str, outcomes: dict[str, str]) -> None:
    """Finish files as an ingestion would: `completed` or `failed`."""
    db = Database(settings.database_url)
    try:
        stores = VectorStores(db)
        for file_id, outcome in outcomes.items():
            row = await stores.pending(store_id, file_id)
            assert row is not None
            assert await stores.finish(store_id, file_id, row.content_sha256, chunks=1) \
                if outcome == "completed" else await stores.finish(
                    store_id, file_id, row.content_sha256,
                    error={"code": "invalid_file", "message": "unreadable"})
    finally:
        await db.close()


FILES = "GET /vector_stores/{vector_store_id}/file_batches/{batch_id}/files"


def batch_shape(payload: dict[str, Any]) -> dict[str, int]:
    VectorStoreFileBatch.model_validate(payload, strict=True)
    assert_conforms(payload, "VectorStoreFileBatchObject")
    counts: dict[str, int] = payload["file_counts"]
    return counts


async def test_a_batch_follows_its_files(api: tuple[httpx.AsyncClient, Settings, Any]) -> None:
    client, settings, _ = api
    headers, key_id = await member(client)
    store = (await client.post("/v1/vector_stores", headers=headers, json={})).json()
    ids = await upload(client, headers, 3)
    url = f"/v1/vector_stores/{store['id']}/file_batches"
    created = await client.post(url, headers=headers, json={
        "file_ids": ids, "attributes": {"team": "support"},
        "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 100,
                                                           "chunk_overlap_tokens": 10}}})
    assert created.status_code == 200, created.text
    batch = created.json()
    assert batch_shape(batch) == {"in_progress": 3, "completed": 0, "failed": 0,
                                  "cancelled": 0, "total": 3}
    assert batch["status"] == "in_progress" and batch["id"].startswith("vsfb_")
    assert batch["object"] == "vector_store.files_batch"
    # Each file is queued for ingestion once, and attached for the calling key.
    redis = Redis.from_url(REDIS_URL)
    try:
        assert sorted(await sent(redis, settings.redis_prefix, INGEST_QUEUE)) == [store["id"]] * 3
    finally:
        await redis.aclose()
    files = (await client.get(f"{url}/{batch['id']}/files", headers=headers)).json()
    assert_conforms(files, FILES)
    for f in files["data"]:
        VectorStoreFile.model_validate(f, strict=True)
        assert f["attributes"] == {"team": "support"}
        assert f["chunking_strategy"]["static"]["max_chunk_size_tokens"] == 100
    db = Database(settings.database_url)
    try:
        async with db.session() as session:
            rows = list(await session.scalars(select(VectorStoreFileRow).where(
                VectorStoreFileRow.store_id == store["id"])))
    finally:
        await db.close()
    assert {(r.key_id, r.batch_id) for r in rows} == {(key_id, batch["id"])}

    await as_worker(settings, store["id"], {ids[0]: "completed"})
    now = (await client.get(f"{url}/{batch['id']}", headers=headers)).json()
    assert now["status"] == "in_progress" and batch_shape(now)["completed"] == 1
    await as_worker(settings, store["id"], {ids[1]: "completed", ids[2]: "failed"})
    done = (await client.get(f"{url}/{batch['id']}", headers=headers)).json()
    assert done["status"] == "completed"
    assert batch_shape(done) == {"in_progress": 0, "completed": 2, "failed": 1,
                                 "cancelled": 0, "total": 3}
    failed_page = (await client.get(f"{url}/{batch['id']}/files", headers=headers,
                                    params={"filter": "failed"})).json()
    assert_conforms(failed_page, FILES)  # a failed file's `last_error` included
    failed = failed_page["data"]
    assert [f["id"] for f in failed] == [ids[2]]
    assert failed[0]["last_error"] == {"code": "invalid_file", "message": "unreadable"}
    # Cancelling a finished batch changes nothing.
    again = (await client.post(f"{url}/{batch['id']}/cancel", headers=headers)).json()
    assert_conforms(again, "VectorStoreFileBatchObject")
    assert again["status"] == "completed" and again["file_counts"] == done["file_counts"]


async def test_cancelling_stops_the_files_not_ingested(
        api: tuple[httpx.AsyncClient, Settings, Any]) -> None:
    client, settings, _ = api
    store = (await client.post("/v1/vector_stores", json={})).json()
    ids = await upload(client, {}, 3)
    url = f"/v1/vector_stores/{store['id']}/file_batches"
    batch = (await client.post(url, json={"files": [
        {"file_id": ids[0]}, {"file_id": ids[1], "attributes": {"n": 1}},
        {"file_id": ids[2]}]})).json()
    await as_worker(settings, store["id"], {ids[0]: "completed"})
    cancelled = await client.post(f"{url}/{batch['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert batch_shape(cancelled.json()) == {"in_progress": 0, "completed": 1, "failed": 0,
                                             "cancelled": 2, "total": 3}
    listed = (await client.get(f"{url}/{batch['id']}/files",
                               params={"filter": "cancelled", "order": "asc"})).json()
    assert_conforms(listed, FILES)
    empty = (await client.get(f"{url}/{batch['id']}/files", params={"filter": "failed"})).json()
    assert_conforms(empty, FILES)
    assert empty["data"] == []
    assert sorted(f["id"] for f in listed["data"]) == sorted(ids[1:])
    assert (await client.get(f"/v1/vector_stores/{store['id']}")).json()["file_counts"][
        "cancelled"] == 2
    # A cancelled file attached again is ingested again (and leaves the cancelled batch).
    again = await client.post(f"/v1/vector_stores/{store['id']}/files",
                              json={"file_id": ids[2]})
    assert again.json()["status"] == "in_progress"
    after = (await client.get(f"{url}/{batch['id']}")).json()
    assert after["status"] == "cancelled" and after["file_counts"]["total"] == 2


async def test_a_batch_the_queue_refused_fails_with_its_files(
        api: tuple[httpx.AsyncClient, Settings, Any]) -> None:
    client, _, app = api
    store = (await client.post("/v1/vector_stores", json={})).json()
    ids = await upload(client, {}, 2)
    services_of(app).celery.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens
    batch = (await client.post(f"/v1/vector_stores/{store['id']}/file_batches",
                               json={"file_ids": ids})).json()
    assert batch["status"] == "failed" and batch_shape(batch)["failed"] == 2
    files = (await client.get(f"/v1/vector_stores/{store['id']}/file_batches/{batch['id']}"
                              "/files")).json()["data"]
    assert {f["last_error"]["code"] for f in files} == {"server_error"}
    assert all("Attach the file again" in f["last_error"]["message"] for f in files)


async def test_bad_batches_are_refused_whole_naming_the_field(
        api: tuple[httpx.AsyncClient, Settings, Any]) -> None:
    client, settings, _ = api
    headers, _ = await member(client)
    store = (await client.post("/v1/vector_stores", headers=headers, json={})).json()
    mine = await upload(client, headers, 1)
    theirs = await upload(client, {}, 1)  # the admin tenant's
    url = f"/v1/vector_stores/{store['id']}/file_batches"
    too_many = mine + [f"file-{i}" for i in range(3)]  # over max_batch_files (3)
    static = {"type": "static", "static": {"max_chunk_size_tokens": 100,
                                           "chunk_overlap_tokens": 90}}
    for body, param in [
            ({"file_ids": mine + theirs}, "file_ids[1]"),
            ({"file_ids": [*mine, "file-nope"]}, "file_ids[1]"),
            ({"file_ids": mine + mine}, "file_ids[1]"),
            ({"file_ids": []}, "file_ids"),
            ({"files": []}, "files"),
            ({}, "file_ids"),
            ({"file_ids": too_many}, "file_ids"),
            ({"file_ids": mine, "files": [{"file_id": mine[0]}]}, "files"),
            ({"files": [{"file_id": mine[0]}], "chunking_strategy": static},
             "chunking_strategy"),
            ({"files": [{"file_id": mine[0]}, {"file_id": theirs[0]}]}, "files[1].file_id"),
            ({"files": [{"file_id": mine[0], "chunking_strategy": static}]},
             "files[0].chunking_strategy.static.chunk_overlap_tokens"),
            ({"file_ids": mine, "chunking_strategy": static},
             "chunking_strategy.static.chunk_overlap_tokens"),
            ({"file_ids": mine, "attributes": {"k": [1]}}, "attributes.k"),
            ({"file_ids": mine, "surprise": 1}, "surprise")]:
        resp = await client.post(url, headers=headers, json=body)
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error", error
        assert (error["param"] or "").startswith(param), (body, error)
    # Nothing was created: no batch, no attached file.
    assert (await client.get(f"/v1/vector_stores/{store['id']}", headers=headers)
            ).json()["file_counts"]["total"] == 0
    db = Database(settings.database_url)
    try:
        async with db.session() as session:
            assert list(await session.scalars(select(VectorStoreFileBatchRow))) == []
    finally:
        await db.close()
    # Another tenant's store, or batch, is missing, exactly like one that does not exist.
    batch = (await client.post(url, headers=headers, json={"file_ids": mine})).json()
    mine_missing = await client.get(f"{url}/vsfb_nope", headers=headers)
    for path in (f"{url}/{batch['id']}", f"{url}/{batch['id']}/files"):
        theirs_resp = await client.get(path)  # the admin tenant
        assert theirs_resp.status_code == 404
    assert (await client.post(f"{url}/{batch['id']}/cancel")).status_code == 404
    assert mine_missing.status_code == 404
    assert mine_missing.json()["error"]["param"] == "batch_id"
    other_store = (await client.post("/v1/vector_stores", json={})).json()
    wrong_store = await client.get(
        f"/v1/vector_stores/{other_store['id']}/file_batches/{batch['id']}")
    assert wrong_store.status_code == 404 and wrong_store.json()["error"]["param"] == "batch_id"
    foreign = await client.post(url, json={"file_ids": theirs})
    assert foreign.status_code == 404
    assert foreign.json()["error"]["param"] == "vector_store_id"
    bad_filter = await client.get(f"{url}/{batch['id']}/files", headers=headers,
                                  params={"filter": "done"})
    assert bad_filter.status_code == 400 and bad_filter.json()["error"]["param"] == "filter"
