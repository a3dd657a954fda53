"""Vector stores in the store, on SQLite and PostgreSQL: tenants own their stores, a file's
ingestion completes only for the content it was started for, counts follow statuses."""

from __future__ import annotations

import pytest

from llmops.store import Database, StoredFile
from retrieval.stores import VectorStores
from tenancy.tenants import NotFoundError

CHUNKING = {"max_tokens": 254, "overlap_tokens": 127}


async def _file(db: Database, file_id: str, sha: str) -> StoredFile:
    row = StoredFile(id=file_id, tenant_id="ten_a", purpose="assistants", filename="a.txt",
                     bytes=10, sha256=sha)
    async with db.session() as session:
        session.add(row)
        await session.commit()
    return row


async def test_a_store_belongs_to_its_tenant(db: Database) -> None:
    stores = VectorStores(db)
    mine = await stores.create("ten_a", "docs", {"team": "support"})
    assert (await stores.get("ten_a", mine.id)).metadata_ == {"team": "support"}
    with pytest.raises(NotFoundError):
        await stores.get("ten_b", mine.id)
    assert (await stores.list_stores("ten_b", limit=10))[0] == []
    with pytest.raises(NotFoundError):
        await stores.delete("ten_b", mine.id)


async def test_ingestion_completes_only_the_content_it_was_started_for(db: Database) -> None:
    stores = VectorStores(db)
    store = await stores.create("ten_a", None, {})
    file = await _file(db, "file-1", "a" * 64)
    row, queued = await stores.attach(store, file, {"lang": "en"}, CHUNKING, "key_a")
    assert queued and row.status == "in_progress"
    _, queued = await stores.attach(store, file, {"lang": "en"}, CHUNKING, "key_a")
    assert not queued  # the same content is already on its way
    assert not await stores.finish(store.id, file.id, "b" * 64, chunks=3)  # stale content
    assert await stores.finish(store.id, file.id, "a" * 64, chunks=3, usage_bytes=30)
    assert not await stores.finish(store.id, file.id, "a" * 64, chunks=3)  # only once
    counts, usage = await stores.file_counts(store.id)
    assert counts == {"in_progress": 0, "completed": 1, "failed": 0, "cancelled": 0,
                      "total": 1} and usage == 30
    # New attributes mean a new ingestion; a detached file is never completed.
    _, queued = await stores.attach(store, file, {"lang": "de"}, CHUNKING, "key_a")
    assert queued and await stores.pending(store.id, file.id) is not None
    await stores.detach("ten_a", store.id, file.id)
    assert not await stores.finish(store.id, file.id, "a" * 64, chunks=3)
    assert (await stores.file_counts(store.id))[0]["total"] == 0


async def test_failures_are_recorded(db: Database) -> None:
    stores = VectorStores(db)
    store = await stores.create("ten_a", None, {})
    file = await _file(db, "file-2", "c" * 64)
    await stores.attach(store, file, {}, CHUNKING, "key_a")
    error = {"code": "invalid_file", "message": "Could not parse a.txt: empty."}
    assert await stores.finish(store.id, file.id, "c" * 64, error=error)
    row = await stores.get_file("ten_a", store.id, file.id)
    assert row.status == "failed" and row.last_error == error
    listed, more = await stores.list_files("ten_a", store.id, limit=10, status="failed")
    assert [r.file_id for r in listed] == [file.id] and not more
