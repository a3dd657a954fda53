"""Uploaded files on SQLite and PostgreSQL: a deleted tenant's files go, rows and bytes, and
nobody else's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmops.files import Files
from llmops.store import Database
from tenancy.tenants import NotFoundError


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_deleted_tenants_files_go_rows_and_bytes(db: Database, tmp_path: Path) -> None:
    files = Files(db, tmp_path, max_bytes=1024)
    mine = [await files.create("ten_a", f"{n}.txt", "assistants", _chunks(b"data"))
            for n in range(2)]
    kept = await files.create("ten_b", "b.txt", "assistants", _chunks(b"data"))
    assert await files.forget_tenant("ten_a") == 2
    for row in mine:
        with pytest.raises(NotFoundError):
            await files.get("ten_a", row.id)
        assert not files.path(row).exists()
    assert not (tmp_path / "ten_a").exists()
    assert (await files.get("ten_b", kept.id)).id == kept.id and files.path(kept).exists()
    assert await files.forget_tenant("ten_a") == 0
