"""Deleting a tenant through the admin API, in process (real SQLite store, embedded vector
index, real Redis broker, no engine or worker: what needs a model is written through the
stores): only a disabled tenant goes, never the bootstrap admin's, not while a worker holds
its work; afterwards its key is refused, every object of it is missing, its ledger stays,
and another tenant's data is untouched. A second delete answers 404, a purge that failed part
way is finished by deleting again, and `llmops tenants delete` does it through the gateway."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select, update

from gateway.app import create_app, services_of
from llmops.cli import main as cli
from llmops.cli.stack import free_port
from llmops.settings import Settings
from llmops.store import StoredResponse, UsageRecord, utcnow
from retrieval.chunking import Chunk
from retrieval.index import Point
from retrieval.sparse import SparseEncoder
from tests.databases import REDIS_URL, in_process_gateway

ADMIN = "sk-unit-tenant-deletion"
DEAD = "http://127.0.0.1:9"  # no engine is called
DIM = 8


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        redis_url=REDIS_URL, redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        finetune={"adapters_root": tmp_path / "adapters"},
                        retrieval={"path": tmp_path / "qdrant", "dimensions": DIM},
                        responses={"ttl_days": 30},
                        models=[{"name": "chat", "kind": "chat",
                                 "pools": [{"device": "cpu", "urls": [DEAD]}]},
                                {"name": "embed", "kind": "embedding",
                                 "pools": [{"device": "cpu", "urls": [DEAD]}]}])
    app = create_app(settings)
    async with in_process_gateway(settings, ADMIN, app) as client:
        yield client, app


def ok(resp: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    return body


def refused(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return str(error["message"])


async def tenant_with_data(client: httpx.AsyncClient, app: FastAPI) -> dict[str, Any]:
    """A tenant with a key, a file, a vector store with that file and its chunks, stored
    responses, a conversation, a batch, a fine-tuning job with an adapter folder and a
    usage record; returns their ids and the key's headers."""
    s = services_of(app)
    tenant = ok(await client.post("/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:6]}"}),
                201)
    key = ok(await client.post("/admin/keys", json={"tenant_id": tenant["id"]}), 201)
    me = {"authorization": f"Bearer {key['key']}"}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}}
    file_id = ok(await client.post("/v1/files", headers=me, data={"purpose": "batch"},
                                   files={"file": ("in.jsonl", orjson.dumps(line) + b"\n")}))["id"]
    store_id = ok(await client.post("/v1/vector_stores", headers=me, json={"name": "docs"}))["id"]
    ok(await client.post(f"/v1/vector_stores/{store_id}/files", headers=me,
                         json={"file_id": file_id}))
    chunk = Point.for_chunk(tenant=tenant["id"], store=store_id, file=file_id, filename="d",
                            attributes={}, content_hash="h", chunk=Chunk(0, 0, 5, "hello"),
                            dense=[1.0] + [0.0] * (DIM - 1),
                            sparse=SparseEncoder().encode_document("hello"))
    assert s.retriever is not None
    s.retriever.index.replace_file(tenant["id"], store_id, file_id, [chunk])
    batch_id = ok(await client.post("/v1/batches", headers=me, json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}))["id"]
    conversation_id = ok(await client.post("/v1/conversations", headers=me, json={
        "items": [{"type": "message", "role": "user", "content": "hi"}]}))["id"]
    response_id = f"resp_{uuid.uuid4().hex}"
    await s.responses.save(tenant["id"], key["id"], {
        "id": response_id, "object": "response", "status": "completed", "output": []}, [])
    job = await s.jobs.create(tenant_id=tenant["id"], key_id=key["id"], model="chat",
                              training_file=file_id)
    (s.settings.finetune.adapters_root / job.id / "adapter").mkdir(parents=True)
    async with s.db.session() as session:
        session.add(UsageRecord(request_id=f"req-{uuid.uuid4().hex}", created_at=utcnow(),
                                tenant_id=tenant["id"], key_id=key["id"], endpoint="chat",
                                model="chat", status=200, cost_usd=Decimal("0.5")))
        await session.commit()
    return {"tenant": tenant["id"], "key": key["id"], "headers": me, "file": file_id,
            "store": store_id, "batch": batch_id, "conversation": conversation_id,
            "response": response_id, "job": job.id}


def object_urls(t: dict[str, Any]) -> list[str]:
    return [f"/v1/files/{t['file']}", f"/v1/files/{t['file']}/content",
            f"/v1/vector_stores/{t['store']}", f"/v1/vector_stores/{t['store']}/files/{t['file']}",
            f"/v1/batches/{t['batch']}", f"/v1/conversations/{t['conversation']}",
            f"/v1/conversations/{t['conversation']}/items", f"/v1/responses/{t['response']}",
            f"/v1/fine_tuning/jobs/{t['job']}"]


async def test_a_deleted_tenant_leaves_nothing_but_its_ledger(
        api: tuple[httpx.AsyncClient, FastAPI]) -> None:
    client, app = api
    s = services_of(app)
    gone, kept = await tenant_with_data(client, app), await tenant_with_data(client, app)
    for url in object_urls(gone):
        ok(await client.get(url, headers=gone["headers"]))  # all there before

    # Admins only; only once disabled, and never the bootstrap admin's tenant.
    refused(await client.delete(f"/admin/tenants/{gone['tenant']}", headers=kept["headers"]),
            403, "permission_denied")
    message = refused(await client.delete(f"/admin/tenants/{gone['tenant']}"), 409,
                      "tenant_not_disabled")
    assert "disable" in message
    refused(await client.delete("/admin/tenants/ten_admin"), 409, "tenant_protected")
    ok(await client.post(f"/admin/tenants/{gone['tenant']}/disable"))
    # Not while a worker holds its work: that is stopped and named.
    assert await s.batches.batches.claim(gone["batch"], "worker-1", 60) is not None
    message = refused(await client.delete(f"/admin/tenants/{gone['tenant']}"), 409,
                      "tenant_busy")
    assert gone["batch"] in message
    assert not await s.batches.batches.heartbeat(gone["batch"], "worker-1", 60)
    assert await s.batches.batches.enter(gone["batch"], "worker-1", "cancelled")

    deleted = ok(await client.delete(f"/admin/tenants/{gone['tenant']}"))
    assert deleted == {"id": gone["tenant"], "object": "tenant.deleted", "deleted": True}

    refused(await client.get("/v1/models", headers=gone["headers"]), 401, "invalid_api_key")
    refused(await client.get(f"/admin/tenants/{gone['tenant']}"), 404, "not_found")
    refused(await client.get(f"/admin/keys/{gone['key']}"), 404, "not_found")
    refused(await client.delete(f"/admin/tenants/{gone['tenant']}"), 404, "not_found")
    assert gone["tenant"] not in {t["id"] for t in ok(await client.get("/admin/tenants"))["data"]}
    # Its objects are missing whoever asks (here the other tenant, as for any id it does not
    # own), and nothing of them is left in the store, the index or on disk.
    for url in object_urls(gone):
        refused(await client.get(url, headers=kept["headers"]), 404, "not_found")
    assert s.retriever is not None
    assert s.retriever.index.count(gone["store"]) == 0
    assert await s.responses.find(gone["response"]) is None
    assert not (s.settings.files.root / gone["tenant"]).exists()
    assert not (s.settings.finetune.adapters_root / gone["job"]).exists()
    async with s.db.session() as session:
        ledger = list(await session.scalars(
            select(UsageRecord.tenant_id).where(UsageRecord.tenant_id == gone["tenant"])))
    assert ledger == [gone["tenant"]]  # kept for accounting

    # The other tenant's data is untouched.
    for url in object_urls(kept):
        ok(await client.get(url, headers=kept["headers"]))
    assert s.retriever.index.count(kept["store"]) == 1
    assert (s.settings.finetune.adapters_root / kept["job"] / "adapter").exists()


async def test_a_response_past_its_retention_is_missing_and_purged(
        api: tuple[httpx.AsyncClient, FastAPI]) -> None:
    client, app = api
    s = services_of(app)
    t = await tenant_with_data(client, app)
    url = f"/v1/responses/{t['response']}"
    ok(await client.get(url, headers=t["headers"]))
    long_ago = utcnow() - timedelta(days=31)  # `responses.ttl_days` is 30
    async with s.db.session() as session:
        await session.execute(update(StoredResponse).where(StoredResponse.id == t["response"])
                              .values(created_at=long_ago,
                                      expires_at=long_ago + timedelta(days=30)))
        await session.commit()
    refused(await client.get(url, headers=t["headers"]), 404, "not_found")
    assert await s.responses.purge_expired() == 1
    assert await s.responses.find(t["response"]) is None
    # A conversation has no retention of its own.
    ok(await client.get(f"/v1/conversations/{t['conversation']}", headers=t["headers"]))


async def test_a_purge_that_failed_midway_is_finished_by_deleting_again(
        api: tuple[httpx.AsyncClient, FastAPI], monkeypatch: pytest.MonkeyPatch) -> None:
    client, app = api
    s = services_of(app)
    t = await tenant_with_data(client, app)
    ok(await client.post(f"/admin/tenants/{t['tenant']}/disable"))

    async def down(tenant_id: str) -> int:
        raise ConnectionError("the database went away")

    with monkeypatch.context() as patched:  # the purge stops after the earlier steps
        patched.setattr(s.conversations, "forget_tenant", down)
        resp = await client.delete(f"/admin/tenants/{t['tenant']}")
        assert resp.status_code == 500 and set(resp.json()["error"]) == {
            "message", "type", "param", "code"}
    assert ok(await client.get(f"/admin/tenants/{t['tenant']}"))["id"] == t["tenant"]
    assert s.retriever is not None and s.retriever.index.count(t["store"]) == 0
    ok(await client.delete(f"/admin/tenants/{t['tenant']}"))
    refused(await client.get(f"/admin/tenants/{t['tenant']}"), 404, "not_found")
    assert await s.conversations.forget_tenant(t["tenant"]) == 0  # the retry took them
    assert not (s.settings.files.root / t["tenant"]).exists()


async def test_the_cli_deletes_a_tenant_by_name_through_the_gateway(
        api: tuple[httpx.AsyncClient, FastAPI], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    client, app = api
    t = await tenant_with_data(client, app)
    name = ok(await client.get(f"/admin/tenants/{t['tenant']}"))["name"]
    port = free_port()
    # The app is started already (the fixture ran its lifespan): uvicorn only serves it.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        gateway = ["--base-url", f"http://127.0.0.1:{port}/v1", "--api-key", ADMIN]
        state = ["--state-dir", str(tmp_path / "state")]
        assert await asyncio.to_thread(cli, [*state, "tenants", "delete", name, *gateway]) == 1
        assert "disable it first" in capsys.readouterr().err
        assert await asyncio.to_thread(
            cli, [*state, "tenants", "delete", name, "--disable", *gateway]) == 0
        assert capsys.readouterr().out.strip() == f"deleted {t['tenant']}  {name}"
        assert await asyncio.to_thread(cli, [*state, "tenants", "delete", name, *gateway]) == 1
        assert f"no tenant {name!r}" in capsys.readouterr().err
    finally:
        server.should_exit = True
        await serving
    refused(await client.get(f"/admin/tenants/{t['tenant']}"), 404, "not_found")
