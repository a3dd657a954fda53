"""Uploaded files (OpenAI's Files API) owned by tenants: rows in the SQL store, bytes in a
local folder. Clients upload files of the `PURPOSES`; our workers write files of the
`OUTPUT_PURPOSES` (a batch's output and error files), which their owner downloads but
cannot upload. An upload is written to a temporary file, counted and hashed as it arrives,
synced, and renamed into place only when complete, so a failed or oversized upload leaves
nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from sqlalchemy import delete, select

from llmops.store import Database, StoredFile
from tenancy.tenants import NotFoundError

__all__ = ["BATCH_OUTPUT", "OUTPUT_PURPOSES", "PURPOSES", "FileTooLargeError", "Files"]

PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "evals")
BATCH_OUTPUT = "batch_output"
OUTPUT_PURPOSES = (BATCH_OUTPUT,)


class FileTooLargeError(ValueError):
    pass


class Files:
    def __init__(self, db: Database, root: Path, max_bytes: int) -> None:
        self.db = db
        self.root = root
        self.max_bytes = max_bytes

    def path(self, row: StoredFile) -> Path:
        return self.root / row.tenant_id / row.id

    async def create(self, tenant_id: str, filename: str, purpose: str,
                     chunks: AsyncIterator[bytes], *, file_id: str | None = None,
                     max_bytes: int | None = None) -> StoredFile:
        """Store a file; `file_id`: the id a worker chose (so that a retried write replaces
        its own earlier attempt instead of leaving a second file); `max_bytes`: a worker's
        own bound instead of the upload limit."""
        file_id = file_id or "file-" + secrets.token_hex(12)
        limit = self.max_bytes if max_bytes is None else max_bytes
        final = self.root / tenant_id / file_id
        part = self.root / "incoming" / f"{file_id}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        try:
            with part.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise FileTooLargeError(f"File exceeds the limit of {limit} bytes.")
                    digest.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(os.fsync, out.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
            row = StoredFile(id=file_id, tenant_id=tenant_id, purpose=purpose,
                             filename=filename[:255], bytes=size, sha256=digest.hexdigest())
            async with self.db.session() as session:
                session.add(row)
                await session.commit()
        except BaseException:
            part.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        return row

    async def list(self, tenant_id: str, *, purpose: str | None = None, limit: int = 10_000,
                   after: str | None = None) -> tuple[list[StoredFile], bool]:
        """Newest first; `after` continues from a file id of an earlier page."""
        query = select(StoredFile).where(StoredFile.tenant_id == tenant_id)
        if purpose is not None:
            query = query.where(StoredFile.purpose == purpose)
        if after is not None:
            cursor = await self.get(tenant_id, after)
            query = query.where((StoredFile.created_at < cursor.created_at)
                                | ((StoredFile.created_at == cursor.created_at)
                                   & (StoredFile.id < cursor.id)))
        query = query.order_by(StoredFile.created_at.desc(), StoredFile.id.desc())
        async with self.db.session() as session:
            rows = list(await session.scalars(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    async def get(self, tenant_id: str, file_id: str) -> StoredFile:
        """A file of this tenant; another tenant's file is reported as missing."""
        async with self.db.session() as session:
            row = await session.get(StoredFile, file_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"No such File object: {file_id}")
        return row

    async def get_many(self, tenant_id: str, file_ids: Sequence[str]) -> dict[str, StoredFile]:
        """The files of this tenant among `file_ids`, by id (in one query); the rest are
        missing or another tenant's."""
        async with self.db.session() as session:
            rows = await session.scalars(select(StoredFile).where(
                StoredFile.tenant_id == tenant_id, StoredFile.id.in_(file_ids)))
            return {row.id: row for row in rows}

    async def forget_tenant(self, tenant_id: str) -> int:
        """Remove every file of a deleted tenant, rows and bytes (its whole folder); returns
        how many rows."""
        async with self.db.session() as session:
            gone = await session.execute(delete(StoredFile)
                                         .where(StoredFile.tenant_id == tenant_id))
            await session.commit()
        await asyncio.to_thread(shutil.rmtree, self.root / tenant_id, ignore_errors=True)
        return int(gone.rowcount)  # type: ignore[attr-defined]

    async def delete(self, tenant_id: str, file_id: str) -> None:
        row = await self.get(tenant_id, file_id)
        async with self.db.session() as session:
            await session.delete(await session.merge(row))
            await session.commit()
        self.path(row).unlink(missing_ok=True)
