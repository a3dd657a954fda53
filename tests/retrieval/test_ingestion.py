"""Ingestion against a stand-in gateway (real store, real tokenizer): the embedding calls are
made as the key that attached the file, a refusal by that key's limits or budget fails the
file with the gateway's reason at once, and a rate limit that names its wait is waited out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import update

from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Database, VectorStore, VectorStoreFile
from retrieval.ingestion import run_ingest
from retrieval.stores import VectorStores
from tenancy.tenants import ON_BEHALF_HEADER, Tenancy

ADMIN = "sk-unit-ingest"
CHUNKING = {"max_tokens": 100, "overlap_tokens": 20}
Answer = Callable[[int], web.Response]


@contextlib.asynccontextmanager
async def gateway(answer: Answer, meanwhile: Callable[[], Awaitable[None]] | None = None
                  ) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A stand-in gateway: `answer(n)` answers the n-th embedding call (from 1), after
    `meanwhile` ran; the points are taken as the real gateway takes them. Yields its URL and
    each call's headers (by lowercase name)."""
    calls: list[dict[str, str]] = []

    async def embeddings(request: web.Request) -> web.Response:
        calls.append({name.lower(): value for name, value in request.headers.items()})
        if meanwhile is not None:
            await meanwhile()
        return answer(len(calls))

    async def points(request: web.Request) -> web.Response:
        return web.json_response({"chunks": len((await request.json())["points"])})

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_put("/internal/vector_stores/{store}/files/{file}/points", points)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", calls
    finally:
        await runner.cleanup()


def embedded(_: int) -> web.Response:
    return web.json_response({"data": [{"index": 0, "embedding": "AACAPw=="}]})  # [1.0]


def refused(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "requests", "param": None,
                                        "code": code}}, status=status, headers=headers)


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return prepare_models(models_home())["embedding"]


async def attached(db: Database, tmp_path: Path, key_id: str | None, tenant_id: str = "ten_a",
                   text: str = "The Zorblax kettle has a seven-year warranty.",
                   ) -> tuple[VectorStore, str]:
    """A store of `tenant_id` with one file attached by `key_id` (None: by no recorded key,
    as files attached before keys were recorded)."""
    files, stores = Files(db, tmp_path / "files", 1 << 20), VectorStores(db)

    async def body() -> AsyncIterator[bytes]:
        yield text.encode()

    file = await files.create(tenant_id, "kettle.txt", "assistants", body())
    store = await stores.create(tenant_id, None, {})
    await stores.attach(store, file, {}, CHUNKING, key_id or "")
    if key_id is None:
        async with db.session() as session:
            await session.execute(update(VectorStoreFile).where(
                VectorStoreFile.file_id == file.id).values(key_id=None))
            await session.commit()
    return store, file.id


def settings_for(database_url: str, tmp_path: Path, url: str, weights: Path,
                 embed_batch: int = 64) -> Settings:
    return Settings(admin_key=ADMIN, database_url=database_url,
                    files={"root": tmp_path / "files"},
                    retrieval={"gateway_url": url, "embed_batch": embed_batch},
                    models=[{"name": "minilm", "kind": "embedding", "context_length": 256,
                             "weights": str(weights),
                             "pools": [{"device": "cpu", "urls": ["http://127.0.0.1:9"]}]}])


async def outcome(db: Database, store: VectorStore, file_id: str) -> tuple[str, Any]:
    row = await VectorStores(db).get_file(store.tenant_id, store.id, file_id)
    return row.status, row.last_error


async def test_embeddings_are_made_as_the_attaching_key(
        db: Database, database_url: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    store, file_id = await attached(db, tmp_path, "key_member")
    async with gateway(embedded) as (url, calls):
        result = await run_ingest(store.id, file_id,
                                  settings_for(database_url, tmp_path, url, tokenizer_dir))
    assert result == "completed" and len(calls) == 1
    assert calls[0]["authorization"] == f"Bearer {ADMIN}"
    assert calls[0][ON_BEHALF_HEADER] == "key_member"
    assert calls[0]["x-request-id"].startswith(f"ingest.{store.id}.{file_id}.0.")


async def test_a_spent_budget_fails_the_file_at_once(
        db: Database, database_url: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    store, file_id = await attached(db, tmp_path, "key_member")
    message = "You exceeded the budget of this tenant: 0.0100 USD for the current period."
    async with gateway(lambda _: refused(429, "insufficient_quota", message)) as (url, calls):
        result = await run_ingest(store.id, file_id,
                                  settings_for(database_url, tmp_path, url, tokenizer_dir))
    assert result == "failed" and len(calls) == 1  # not tried again
    status, error = await outcome(db, store, file_id)
    assert status == "failed" and error["code"] == "insufficient_quota"
    assert message in error["message"] and "key_member" in error["message"]


async def test_a_rate_limit_with_a_wait_is_waited_out_a_bounded_number_of_times(
        db: Database, database_url: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    store, file_id = await attached(db, tmp_path, "key_member")
    def limited(_: int) -> web.Response:
        return refused(429, "rate_limit_exceeded", "Rate limit reached for requests per "
                       "minute on this key: limit 1. Try again in 1.0s.", **{"retry-after": "1"})

    async with gateway(lambda n: limited(n) if n == 1 else embedded(n)) as (url, calls):
        result = await run_ingest(store.id, file_id,
                                  settings_for(database_url, tmp_path, url, tokenizer_dir))
    assert result == "completed" and len(calls) == 2
    assert calls[0]["x-request-id"] != calls[1]["x-request-id"]  # the ledger keeps both
    store, file_id = await attached(db, tmp_path, "key_member")
    async with gateway(limited) as (url, calls):
        result = await run_ingest(store.id, file_id,
                                  settings_for(database_url, tmp_path, url, tokenizer_dir))
    assert result == "failed" and len(calls) == 3
    status, error = await outcome(db, store, file_id)
    assert status == "failed" and error["code"] == "rate_limit_exceeded"


async def test_a_file_attached_before_keys_were_recorded_bills_its_tenant(
        db: Database, database_url: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    tenants = Tenancy(db)
    team = await tenants.create_tenant("team-legacy")
    key, _ = await tenants.create_key(team.id)
    store, file_id = await attached(db, tmp_path, None, team.id)
    async with gateway(embedded) as (url, calls):
        settings = settings_for(database_url, tmp_path, url, tokenizer_dir)
        assert await run_ingest(store.id, file_id, settings) == "completed"
    assert calls[0][ON_BEHALF_HEADER] == key.id
    # A tenant with no usable key is never billed to anyone else: its file fails.
    await tenants.revoke_key(key.id)
    store, file_id = await attached(db, tmp_path, None, team.id)
    async with gateway(embedded) as (url, calls):
        settings = settings_for(database_url, tmp_path, url, tokenizer_dir)
        assert await run_ingest(store.id, file_id, settings) == "failed"
    assert calls == []
    status, error = await outcome(db, store, file_id)
    assert status == "failed" and error["code"] == "invalid_api_key"


async def test_a_file_cancelled_meanwhile_is_embedded_no_further(
        db: Database, database_url: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    text = " ".join(f"Sentence {i} of the long Zorblax kettle manual." for i in range(60))
    store, file_id = await attached(db, tmp_path, "key_member", text=text)

    async def cancel() -> None:  # as cancelling its batch does
        async with db.session() as session:
            await session.execute(update(VectorStoreFile).where(
                VectorStoreFile.file_id == file_id).values(status="cancelled"))
            await session.commit()

    async with gateway(embedded, meanwhile=cancel) as (url, calls):
        settings = settings_for(database_url, tmp_path, url, tokenizer_dir, embed_batch=1)
        assert await run_ingest(store.id, file_id, settings) == "failed"
    assert len(calls) == 1  # of the file's many chunks, one was embedded
    assert await outcome(db, store, file_id) == ("cancelled", None)
