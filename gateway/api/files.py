"""OpenAI's Files API: `POST/GET /v1/files`, `GET/DELETE /v1/files/{id}`,
`GET /v1/files/{id}/content`. Files belong to the caller's tenant."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse

import tenancy
from gateway.http.auth import Authenticated
from gateway.http.paging import bounded, page
from gateway.http.timestamps import epoch
from llmops.errors import (
    BadRequestError,
    InsufficientStorageError,
    NotFoundError,
    RequestTooLargeError,
)
from llmops.files import PURPOSES, Files, FileTooLargeError
from llmops.store import StoredFile

__all__ = ["files_router"]

_CHUNK = 1024 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _file_out(row: StoredFile) -> dict[str, Any]:
    # Files do not expire here, and nothing needs details: `expires_at` and `status_details`
    # are left out, as OpenAI's schema has them (optional, never null).
    return {"id": row.id, "object": "file", "bytes": row.bytes,
            "created_at": epoch(row.created_at), "filename": row.filename,
            "purpose": row.purpose, "status": "processed"}


OnDelete = Callable[[str, str], Awaitable[None]]  # (tenant_id, file_id)


def files_router(files: Files, principal: Authenticated, on_delete: OnDelete | None = None
                 ) -> APIRouter:
    """`on_delete` runs before a file goes, so that what was built from it goes too."""
    router = APIRouter(prefix="/v1/files", tags=["files"],
                       dependencies=[Depends(principal)])

    async def owned(request: Request, file_id: str) -> StoredFile:
        try:
            return await files.get(request.state.principal.tenant_id, file_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="file_id") from None

    @router.post("", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file", "purpose"],
                                           "properties": {
                                               "file": {"type": "string", "format": "binary"},
                                               "purpose": {"type": "string",
                                                           "enum": list(PURPOSES)}}}}}}})
    async def upload(request: Request) -> dict[str, Any]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise BadRequestError("Upload a file as multipart/form-data with the fields "
                                  "'file' and 'purpose'.")
        async with request.form(max_files=1, max_fields=8) as form:
            purpose, upload = form.get("purpose"), form.get("file")
            if not isinstance(purpose, str) or purpose not in PURPOSES:
                raise BadRequestError(f"'purpose' must be one of {list(PURPOSES)}.",
                                      param="purpose")
            if not isinstance(upload, UploadFile):
                raise BadRequestError("The 'file' field with the file's content is missing.",
                                      param="file")

            async def chunks() -> AsyncIterator[bytes]:
                while chunk := await upload.read(_CHUNK):
                    yield chunk

            try:
                row = await files.create(request.state.principal.tenant_id,
                                         upload.filename or "upload", purpose, chunks())
            except FileTooLargeError as exc:
                raise RequestTooLargeError(str(exc), param="file") from None
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    raise
                raise InsufficientStorageError(  # nothing of the upload was kept
                    "The server has no space left to store this file; try again later.",
                    param="file") from None
        return _file_out(row)

    @router.get("")
    async def list_files(request: Request, purpose: str | None = None, limit: int = 10_000,
                         after: str | None = None) -> dict[str, Any]:
        try:
            rows, more = await files.list(request.state.principal.tenant_id, purpose=purpose,
                                          limit=bounded(limit, 10_000), after=after)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return page([_file_out(r) for r in rows], more)

    @router.get("/{file_id}")
    async def retrieve(request: Request, file_id: str) -> dict[str, Any]:
        return _file_out(await owned(request, file_id))

    @router.get("/{file_id}/content", response_class=FileResponse)
    async def content(request: Request, file_id: str) -> FileResponse:
        row = await owned(request, file_id)
        return FileResponse(files.path(row), media_type="application/octet-stream",
                            filename=row.filename)

    @router.delete("/{file_id}")
    async def delete(request: Request, file_id: str) -> dict[str, Any]:
        row = await owned(request, file_id)
        if on_delete is not None:
            await on_delete(row.tenant_id, row.id)
        await files.delete(row.tenant_id, row.id)
        return {"id": row.id, "object": "file", "deleted": True}

    return router
