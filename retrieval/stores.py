"""Vector stores and their files in the SQL store (OpenAI's vector stores API). The chunks
themselves live in the vector index; these rows say which files a store holds and how far
each file's ingestion got.

A file's ingestion is idempotent: its row carries the content hash it is being ingested for,
and `finish` only completes a row that still expects that content, so a re-attached,
re-uploaded or detached file is never marked done by a stale ingestion.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import delete, func, select, update

from llmops.store import Database, StoredFile, VectorStore, VectorStoreFile
from tenancy.tenants import NotFoundError

__all__ = ["FILE_STATUSES", "VectorStores"]

FILE_STATUSES = ("in_progress", "completed", "failed", "cancelled")


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
        await self.get(tenant_id, store_id)
        async with self.db.session() as session:
            await session.execute(delete(VectorStoreFile)
                                  .where(VectorStoreFile.store_id == store_id))
            await session.execute(delete(VectorStore).where(VectorStore.id == store_id))
            await session.commit()

    async def file_counts(self, store_id: str) -> tuple[dict[str, int], int]:
        """Files by status (with the total) and the bytes they use."""
        query = (select(VectorStoreFile.status, func.count(), func.sum(VectorStoreFile.usage_bytes))
                 .where(VectorStoreFile.store_id == store_id)
                 .group_by(VectorStoreFile.status))
        async with self.db.session() as session:
            found = {status: (int(n), int(b or 0)) for status, n, b in await session.execute(query)}
        counts = {s: found.get(s, (0, 0))[0] for s in FILE_STATUSES}
        counts["total"] = sum(counts.values())
        return counts, sum(b for _, b in found.values())

    # Files of a store

    async def attach(self, store: VectorStore, file: StoredFile, attributes: dict[str, Any],
                     chunking: dict[str, int]) -> tuple[VectorStoreFile, bool]:
        """Attach a file (or re-attach it, which ingests it again); returns the row and whether
        an ingestion has to run."""
        async with self.db.session() as session:
            row = await session.get(VectorStoreFile, (store.id, file.id))
            if (row is not None and row.status in ("in_progress", "completed")
                    and row.content_sha256 == file.sha256 and row.chunking == chunking
                    and row.attributes == attributes):
                return row, False  # the same content, already there or on its way
            if row is None:
                row = VectorStoreFile(store_id=store.id, file_id=file.id,
                                      tenant_id=store.tenant_id)
                session.add(row)
            row.status, row.last_error, row.chunks = "in_progress", None, 0
            row.attributes, row.chunking = attributes, chunking
            row.content_sha256, row.usage_bytes = file.sha256, 0
            await session.commit()
            await session.refresh(row)
        return row, True

    async def get_file(self, tenant_id: str, store_id: str, file_id: str) -> VectorStoreFile:
        async with self.db.session() as session:
            row = await session.get(VectorStoreFile, (store_id, file_id))
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"No file found with id '{file_id}' in vector store "
                                f"'{store_id}'.")
        return row

    async def list_files(self, tenant_id: str, store_id: str, *, limit: int,
                         after: str | None = None, status: str | None = None,
                         order: str = "desc") -> tuple[list[VectorStoreFile], bool]:
        await self.get(tenant_id, store_id)
        query = select(VectorStoreFile).where(VectorStoreFile.store_id == store_id)
        if status is not None:
            query = query.where(VectorStoreFile.status == status)
        if after is not None:
            cursor = await self.get_file(tenant_id, store_id, after)
            query = query.where(VectorStoreFile.created_at > cursor.created_at
                                if order == "asc" else
                                VectorStoreFile.created_at < cursor.created_at)
        by = (VectorStoreFile.created_at.asc() if order == "asc"
              else VectorStoreFile.created_at.desc())
        async with self.db.session() as session:
            rows = list(await session.scalars(query.order_by(by).limit(limit + 1)))
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
