"""Vector stores and their files in the SQL store (OpenAI's vector stores API). The chunks
themselves live in the vector index; these rows say which files a store holds and how far
each file's ingestion got.

A file's ingestion is idempotent: its row carries the content hash it is being ingested for,
and `finish` only completes a row that still expects that content, so a re-attached,
re-uploaded or detached file is never marked done by a stale ingestion.

A file batch is a row of its own plus its id on the files it attached: a file belongs to the
batch that attached it last, and the batch's counts are its files' statuses.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from llmops.store import (
    Database,
    StoredFile,
    VectorStore,
    VectorStoreFile,
    VectorStoreFileBatch,
    utcnow,
)
from tenancy.tenants import NotFoundError

__all__ = ["FILE_STATUSES", "Attach", "VectorStores", "batch_status"]

FILE_STATUSES = ("in_progress", "completed", "failed", "cancelled")


@dataclass(frozen=True)
class Attach:
    """One file to attach, as a request asked for it."""

    file: StoredFile
    attributes: dict[str, Any]
    chunking: dict[str, int]


def batch_status(counts: dict[str, int], cancelled: bool) -> str:
    """A file batch's status, from its files' counts: in progress while any file is, then
    cancelled if it was, failed if every file failed, else completed."""
    if counts["in_progress"]:
        return "in_progress"
    if cancelled:
        return "cancelled"
    if counts["total"] and counts["failed"] == counts["total"]:
        return "failed"
    return "completed"


class VectorStores:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, tenant_id: str, name: str | None, metadata: dict[str, Any]
                     ) -> VectorStore:
        row = VectorStore(id="vs_" + secrets.token_hex(12), tenant_id=tenant_id, name=name,
                          metadata_=metadata)
        async with self.db.session() as session:
            session.add(row)
            await session.commit()
        return row

    async def get(self, tenant_id: str, store_id: str) -> VectorStore:
        """A store of this tenant; another tenant's store is reported as missing."""
        async with self.db.session() as session:
            row = await session.get(VectorStore, store_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"No vector store found with id '{store_id}'.")
        return row

    async def list_stores(self, tenant_id: str, *, limit: int, after: str | None = None,
                   order: str = "desc") -> tuple[list[VectorStore], bool]:
        query = select(VectorStore).where(VectorStore.tenant_id == tenant_id)
        if after is not None:
            cursor = await self.get(tenant_id, after)
            newer = order == "asc"
            query = query.where(VectorStore.created_at > cursor.created_at if newer
                                else VectorStore.created_at < cursor.created_at)
        by = VectorStore.created_at.asc() if order == "asc" else VectorStore.created_at.desc()
        async with self.db.session() as session:
            rows = list(await session.scalars(query.order_by(by).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    async def update(self, tenant_id: str, store_id: str, **values: Any) -> VectorStore:
        await self.get(tenant_id, store_id)
        async with self.db.session() as session:
            await session.execute(update(VectorStore).where(VectorStore.id == store_id)
                                  .values(**values))
            await session.commit()
        return await self.get(tenant_id, store_id)

    async def delete(self, tenant_id: str, store_id: str) -> None:
        """Delete a store with its files and file batches."""
        await self.get(tenant_id, store_id)
        async with self.db.session() as session:
            await session.execute(delete(VectorStoreFile)
                                  .where(VectorStoreFile.store_id == store_id))
            await session.execute(delete(VectorStoreFileBatch)
                                  .where(VectorStoreFileBatch.store_id == store_id))
            await session.execute(delete(VectorStore).where(VectorStore.id == store_id))
            await session.commit()

    async def forget_tenant(self, tenant_id: str) -> int:
        """Remove every store of a deleted tenant with its files and file batches (their
        chunks leave the index by `VectorIndex.delete_tenant`); returns how many. A file
        being ingested meanwhile is no longer expected: its points are refused."""
        async with self.db.session() as session:
            await session.execute(delete(VectorStoreFile)
                                  .where(VectorStoreFile.tenant_id == tenant_id))
            await session.execute(delete(VectorStoreFileBatch)
                                  .where(VectorStoreFileBatch.tenant_id == tenant_id))
            gone = await session.execute(delete(VectorStore)
                                         .where(VectorStore.tenant_id == tenant_id))
            await session.commit()
        return int(gone.rowcount)  # type: ignore[attr-defined]

    async def file_counts(self, store_id: str, batch_id: str | None = None
                          ) -> tuple[dict[str, int], int]:
        """Files (of one batch, with `batch_id`) by status, with the total, and the bytes
        they use."""
        query = (select(VectorStoreFile.status, func.count(), func.sum(VectorStoreFile.usage_bytes))
                 .where(VectorStoreFile.store_id == store_id)
                 .group_by(VectorStoreFile.status))
        if batch_id is not None:
            query = query.where(VectorStoreFile.batch_id == batch_id)
        async with self.db.session() as session:
            found = {status: (int(n), int(b or 0)) for status, n, b in await session.execute(query)}
        counts = {s: found.get(s, (0, 0))[0] for s in FILE_STATUSES}
        counts["total"] = sum(counts.values())
        return counts, sum(b for _, b in found.values())

    # Files of a store

    async def attach(self, store: VectorStore, file: StoredFile, attributes: dict[str, Any],
                     chunking: dict[str, int], key_id: str) -> tuple[VectorStoreFile, bool]:
        """Attach a file (or re-attach it, which ingests it again) for the key `key_id`, whose
        limits and ledger its ingestion uses; returns the row and whether an ingestion has to
        run."""
        async with self.db.session() as session:
            attached = await _attach(session, store, Attach(file, attributes, chunking),
                                     key_id, None)
            await session.commit()
            await session.refresh(attached[0])
        return attached

    # File batches

    async def create_batch(self, store: VectorStore, files: list[Attach], key_id: str
                           ) -> tuple[VectorStoreFileBatch, list[tuple[VectorStoreFile, bool]]]:
        """A new batch attaching `files` (distinct, all of the store's tenant), in one
        transaction: the batch and all of its files, or nothing. Returns the batch and each
        file's row with whether an ingestion has to run."""
        batch = VectorStoreFileBatch(id="vsfb_" + secrets.token_hex(12), store_id=store.id,
                                     tenant_id=store.tenant_id)
        async with self.db.session() as session:
            session.add(batch)
            attached = [await _attach(session, store, f, key_id, batch.id) for f in files]
            await session.commit()
            await session.refresh(batch)
            for row, _ in attached:
                await session.refresh(row)
        return batch, attached

    async def get_batch(self, tenant_id: str, store_id: str, batch_id: str
                        ) -> VectorStoreFileBatch:
        """A batch of this tenant's store; another tenant's is reported as missing."""
        async with self.db.session() as session:
            row = await session.get(VectorStoreFileBatch, batch_id)
        if row is None or row.tenant_id != tenant_id or row.store_id != store_id:
            raise NotFoundError(f"No file batch found with id '{batch_id}' in vector store "
                                f"'{store_id}'.")
        return row

    async def cancel_batch(self, tenant_id: str, store_id: str, batch_id: str
                           ) -> VectorStoreFileBatch:
        """Cancel the batch's files not ingested yet (their ingestion, queued or running, then
        finds them no longer pending and stops); files done stay. A batch with nothing left
        to cancel is left as it is."""
        await self.get_batch(tenant_id, store_id, batch_id)
        async with self.db.session() as session:
            stopped = await session.execute(update(VectorStoreFile).where(
                VectorStoreFile.batch_id == batch_id, VectorStoreFile.store_id == store_id,
                VectorStoreFile.status == "in_progress").values(status="cancelled"))
            if stopped.rowcount:  # type: ignore[attr-defined]
                await session.execute(update(VectorStoreFileBatch).where(
                    VectorStoreFileBatch.id == batch_id,
                    VectorStoreFileBatch.cancelled_at.is_(None)).values(cancelled_at=utcnow()))
            await session.commit()
        return await self.get_batch(tenant_id, store_id, batch_id)

    # Files of a store

    async def get_file(self, tenant_id: str, store_id: str, file_id: str) -> VectorStoreFile:
        async with self.db.session() as session:
            row = await session.get(VectorStoreFile, (store_id, file_id))
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"No file found with id '{file_id}' in vector store "
                                f"'{store_id}'.")
        return row

    async def list_files(self, tenant_id: str, store_id: str, *, limit: int,
                         after: str | None = None, status: str | None = None,
                         order: str = "desc", batch_id: str | None = None
                         ) -> tuple[list[VectorStoreFile], bool]:
        """A page of the store's files (of one batch, with `batch_id`), by time of attaching
        and then id: files attached together may share a time."""
        await self.get(tenant_id, store_id)
        query = select(VectorStoreFile).where(VectorStoreFile.store_id == store_id)
        if status is not None:
            query = query.where(VectorStoreFile.status == status)
        if batch_id is not None:
            query = query.where(VectorStoreFile.batch_id == batch_id)
        if after is not None:
            cursor = await self.get_file(tenant_id, store_id, after)
            at, fid = VectorStoreFile.created_at, VectorStoreFile.file_id
            query = query.where(
                or_(at > cursor.created_at, and_(at == cursor.created_at, fid > cursor.file_id))
                if order == "asc" else
                or_(at < cursor.created_at, and_(at == cursor.created_at, fid < cursor.file_id)))
        by = ((VectorStoreFile.created_at.asc(), VectorStoreFile.file_id.asc()) if order == "asc"
              else (VectorStoreFile.created_at.desc(), VectorStoreFile.file_id.desc()))
        async with self.db.session() as session:
            rows = list(await session.scalars(query.order_by(*by).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    async def detach(self, tenant_id: str, store_id: str, file_id: str) -> None:
        await self.get_file(tenant_id, store_id, file_id)
        async with self.db.session() as session:
            await session.execute(delete(VectorStoreFile).where(
                VectorStoreFile.store_id == store_id, VectorStoreFile.file_id == file_id))
            await session.commit()

    async def detach_everywhere(self, tenant_id: str, file_id: str) -> list[str]:
        """Take a file out of every store of its tenant; returns those stores' ids."""
        where = (VectorStoreFile.tenant_id == tenant_id, VectorStoreFile.file_id == file_id)
        async with self.db.session() as session:
            stores = list(await session.scalars(select(VectorStoreFile.store_id).where(*where)))
            await session.execute(delete(VectorStoreFile).where(*where))
            await session.commit()
        return stores

    async def pending(self, store_id: str, file_id: str) -> VectorStoreFile | None:
        """The row if its ingestion is still wanted."""
        async with self.db.session() as session:
            row = await session.get(VectorStoreFile, (store_id, file_id))
        return row if row is not None and row.status == "in_progress" else None

    async def expects(self, store_id: str, file_id: str, sha256: str) -> bool:
        """Whether the file's ingestion of this content is still wanted."""
        row = await self.pending(store_id, file_id)
        return row is not None and row.content_sha256 == sha256

    async def finish(self, store_id: str, file_id: str, sha256: str, *, chunks: int = 0,
                     usage_bytes: int = 0, error: dict[str, str] | None = None) -> bool:
        """Complete (or fail, with `error`) the ingestion of this content; False when the row
        no longer expects it (detached, or attached again with other content)."""
        values: dict[str, Any] = (
            {"status": "failed", "last_error": error} if error is not None else
            {"status": "completed", "chunks": chunks, "usage_bytes": usage_bytes})
        async with self.db.session() as session:
            done = await session.execute(update(VectorStoreFile).where(
                VectorStoreFile.store_id == store_id, VectorStoreFile.file_id == file_id,
                VectorStoreFile.content_sha256 == sha256,
                VectorStoreFile.status == "in_progress").values(**values))
            await session.commit()
        return bool(done.rowcount)  # type: ignore[attr-defined]

    async def store_filenames(self, tenant_id: str, store_id: str) -> dict[str, str]:
        """The files attached to a store of this tenant: file id -> filename."""
        async with self.db.session() as session:
            rows = await session.execute(
                select(VectorStoreFile.file_id, StoredFile.filename)
                .join(StoredFile, StoredFile.id == VectorStoreFile.file_id)
                .where(VectorStoreFile.store_id == store_id,
                       VectorStoreFile.tenant_id == tenant_id))
        return {fid: name for fid, name in rows}

    async def filenames(self, file_ids: list[str]) -> dict[str, str]:
        async with self.db.session() as session:
            rows = await session.execute(select(StoredFile.id, StoredFile.filename)
                                         .where(StoredFile.id.in_(file_ids)))
        return {fid: name for fid, name in rows}


async def _attach(session: AsyncSession, store: VectorStore, want: Attach, key_id: str,
                  batch_id: str | None) -> tuple[VectorStoreFile, bool]:
    """Attach one file in `session`: the row, and whether an ingestion has to run (not when
    the same content, chunking and attributes are already there or on their way)."""
    row = await session.get(VectorStoreFile, (store.id, want.file.id))
    if batch_id is not None and row is not None:
        row.batch_id = batch_id  # the file belongs to the batch that attached it last
    if (row is not None and row.status in ("in_progress", "completed")
            and row.content_sha256 == want.file.sha256 and row.chunking == want.chunking
            and row.attributes == want.attributes):
        return row, False
    if row is None:
        row = VectorStoreFile(store_id=store.id, file_id=want.file.id,
                              tenant_id=store.tenant_id)
        session.add(row)
    row.status, row.last_error, row.chunks = "in_progress", None, 0
    row.attributes, row.chunking = want.attributes, want.chunking
    row.content_sha256, row.usage_bytes = want.file.sha256, 0
    row.key_id, row.batch_id = key_id, batch_id
    return row, True
