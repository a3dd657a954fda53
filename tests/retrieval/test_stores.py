"""Vector stores in the store, on SQLite and PostgreSQL: tenants own their stores, a file's
ingestion completes only for the content it was started for, counts follow statuses; file
batches attach their files whole, count and cancel them, and go with their store."""

from __future__ import annotations

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import update

from llmops.store import (
    Base,
    Database,
    StoredFile,
    VectorStoreFile,
    VectorStoreFileBatch,
    upgrade,
    utcnow,
)
from llmops.store.db import sync_url
from retrieval.stores import Attach, VectorStores, batch_status
from tenancy.tenants import NotFoundError
from tests.evals.test_store import _tables

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


def test_a_batch_status_follows_its_files() -> None:
    def counts(in_progress: int = 0, completed: int = 0, failed: int = 0, cancelled: int = 0
               ) -> dict[str, int]:
        return {"in_progress": in_progress, "completed": completed, "failed": failed,
                "cancelled": cancelled,
                "total": in_progress + completed + failed + cancelled}

    assert batch_status(counts(in_progress=1, completed=2), cancelled=False) == "in_progress"
    assert batch_status(counts(completed=2, failed=1), cancelled=False) == "completed"
    assert batch_status(counts(failed=3), cancelled=False) == "failed"
    assert batch_status(counts(completed=1, cancelled=2), cancelled=True) == "cancelled"
    assert batch_status(counts(), cancelled=False) == "completed"  # its files all detached


async def test_a_batch_attaches_all_its_files_for_its_key(db: Database) -> None:
    stores = VectorStores(db)
    store = await stores.create("ten_a", None, {})
    files = [await _file(db, f"file-b{i}", str(i) * 64) for i in range(3)]
    batch, attached = await stores.create_batch(
        store, [Attach(f, {"n": i}, CHUNKING) for i, f in enumerate(files)], "key_a")
    assert batch.id.startswith("vsfb_") and [queued for _, queued in attached] == [True] * 3
    rows = [await stores.get_file("ten_a", store.id, f.id) for f in files]
    assert {(r.batch_id, r.key_id, r.status) for r in rows} == {(batch.id, "key_a",
                                                                  "in_progress")}
    assert [r.attributes for r in rows] == [{"n": 0}, {"n": 1}, {"n": 2}]
    # A file already there with the same content joins the batch without a new ingestion.
    assert await stores.finish(store.id, files[0].id, files[0].sha256, chunks=1)
    again, attached = await stores.create_batch(store, [Attach(files[0], {"n": 0}, CHUNKING)],
                                                "key_b")
    assert [queued for _, queued in attached] == [False]
    row = await stores.get_file("ten_a", store.id, files[0].id)
    assert (row.batch_id, row.key_id, row.status) == (again.id, "key_a", "completed")
    assert (await stores.file_counts(store.id, batch.id))[0]["total"] == 2
    assert (await stores.file_counts(store.id, again.id))[0]["completed"] == 1
    # Attached alone again (new attributes), a file leaves its batch.
    _, queued = await stores.attach(store, files[1], {"n": 9}, CHUNKING, "key_c")
    row = await stores.get_file("ten_a", store.id, files[1].id)
    assert queued and (row.batch_id, row.key_id) == (None, "key_c")


async def test_cancelling_a_batch_stops_only_what_is_not_done(db: Database) -> None:
    stores = VectorStores(db)
    store = await stores.create("ten_a", None, {})
    files = [await _file(db, f"file-c{i}", str(i) * 64) for i in range(3)]
    batch, _ = await stores.create_batch(store, [Attach(f, {}, CHUNKING) for f in files],
                                         "key_a")
    assert await stores.finish(store.id, files[0].id, files[0].sha256, chunks=1)
    assert await stores.finish(store.id, files[1].id, files[1].sha256,
                               error={"code": "invalid_file", "message": "empty"})
    with pytest.raises(NotFoundError):
        await stores.cancel_batch("ten_b", store.id, batch.id)  # not theirs
    cancelled = await stores.cancel_batch("ten_a", store.id, batch.id)
    assert cancelled.cancelled_at is not None
    counts, _ = await stores.file_counts(store.id, batch.id)
    assert counts == {"in_progress": 0, "completed": 1, "failed": 1, "cancelled": 1,
                      "total": 3}
    assert batch_status(counts, cancelled=True) == "cancelled"
    # The cancelled file's ingestion, if it was under way, can no longer complete it.
    assert await stores.pending(store.id, files[2].id) is None
    assert not await stores.finish(store.id, files[2].id, files[2].sha256, chunks=1)
    # A finished batch has nothing to cancel and is left as it was.
    done, _ = await stores.create_batch(store, [Attach(files[2], {"x": 1}, CHUNKING)],
                                        "key_a")
    assert await stores.finish(store.id, files[2].id, files[2].sha256, chunks=1)
    assert (await stores.cancel_batch("ten_a", store.id, done.id)).cancelled_at is None


async def test_a_batch_belongs_to_its_store_and_goes_with_it(db: Database) -> None:
    stores = VectorStores(db)
    store = await stores.create("ten_a", None, {})
    other = await stores.create("ten_a", None, {})
    file = await _file(db, "file-d", "d" * 64)
    batch, _ = await stores.create_batch(store, [Attach(file, {}, CHUNKING)], "key_a")
    assert (await stores.get_batch("ten_a", store.id, batch.id)).id == batch.id
    for tenant, store_id in (("ten_b", store.id), ("ten_a", other.id)):
        with pytest.raises(NotFoundError):
            await stores.get_batch(tenant, store_id, batch.id)
    await stores.delete("ten_a", store.id)
    async with db.session() as session:
        assert await session.get(VectorStoreFileBatch, batch.id) is None


async def test_a_batch_lists_its_files_in_pages_even_when_attached_at_one_time(
        db: Database) -> None:
    stores = VectorStores(db)
    store = await stores.create("ten_a", None, {})
    files = [await _file(db, f"file-e{i}", str(i) * 64) for i in range(5)]
    batch, _ = await stores.create_batch(store, [Attach(f, {}, CHUNKING) for f in files],
                                         "key_a")
    alone = await _file(db, "file-e9", "9" * 64)
    await stores.attach(store, alone, {}, CHUNKING, "key_a")
    async with db.session() as session:  # the same time for all: ids break the tie
        await session.execute(update(VectorStoreFile).values(created_at=utcnow()))
        await session.commit()
    for order in ("asc", "desc"):
        seen, after, more = [], None, True
        while more:
            page, more = await stores.list_files("ten_a", store.id, limit=2, after=after,
                                                 order=order, batch_id=batch.id)
            seen += [r.file_id for r in page]
            after = seen[-1]
        assert seen == sorted((f.id for f in files), reverse=order == "desc")


def test_the_migration_matches_the_models(database_url: str) -> None:
    upgrade(database_url)
    engine = sqlalchemy.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    ours = {"vector_stores", "vector_store_files", "vector_store_file_batches"}
    assert [d for d in diff if _tables(d) & ours] == []


async def test_a_deleted_tenants_stores_go_with_their_files_and_batches(db: Database) -> None:
    stores = VectorStores(db)
    store = await stores.create("ten_a", "docs", {})
    await stores.attach(store, await _file(db, "file-a", "s1"), {}, CHUNKING, "key_a")
    await stores.create_batch(store, [Attach(await _file(db, "file-b", "s2"), {}, CHUNKING)],
                              "key_a")
    kept = await stores.create("ten_b", "docs", {})
    assert await stores.forget_tenant("ten_a") == 1
    with pytest.raises(NotFoundError):
        await stores.get("ten_a", store.id)
    assert await stores.pending(store.id, "file-a") is None  # its ingestion is refused now
    async with db.session() as session:
        for table in (VectorStoreFile, VectorStoreFileBatch):
            assert list(await session.scalars(sqlalchemy.select(table))) == []
    assert (await stores.get("ten_b", kept.id)).id == kept.id
    assert await stores.forget_tenant("ten_a") == 0
