"""OpenAI's vector store file batches: `POST /v1/vector_stores/{id}/file_batches`,
`GET .../file_batches/{batch_id}`, `POST .../file_batches/{batch_id}/cancel` and
`GET .../file_batches/{batch_id}/files`.

A batch attaches its files exactly as single files are attached (`Ingestion`), billed to the
key that created it; the request is checked whole first (shape, size, every file the caller's
own and named once), so a refused batch leaves neither a batch nor an attached file. Its
status and counts are read from its files' rows (`retrieval.stores.batch_status`).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

import tenancy
from gateway.api.vector_stores import Attributes, Ingestion, file_out
from gateway.http.auth import Authenticated
from gateway.http.paging import bounded, page
from gateway.http.timestamps import epoch
from llmops.errors import BadRequestError, NotFoundError
from llmops.settings import Settings
from llmops.store import VectorStore, VectorStoreFileBatch
from llmops.wire import Wire
from retrieval.stores import FILE_STATUSES, Attach, VectorStores, batch_status

__all__ = ["file_batches_router"]


class BatchFileIn(Wire):
    file_id: str = Field(max_length=64)
    attributes: Attributes | None = None
    chunking_strategy: dict[str, Any] | None = None


class BatchIn(Wire):
    file_ids: list[str] | None = None
    files: list[BatchFileIn] | None = None
    attributes: Attributes | None = None
    chunking_strategy: dict[str, Any] | None = None


async def batch_out(stores: VectorStores, row: VectorStoreFileBatch) -> dict[str, Any]:
    counts, _ = await stores.file_counts(row.store_id, row.id)
    return {"id": row.id, "object": "vector_store.files_batch", "vector_store_id": row.store_id,
            "created_at": epoch(row.created_at),
            "status": batch_status(counts, row.cancelled_at is not None),
            "file_counts": counts}


def file_batches_router(settings: Settings, stores: VectorStores, ingestion: Ingestion,
                        principal: Authenticated) -> APIRouter:
    router = APIRouter(prefix="/v1/vector_stores/{store_id}/file_batches",
                       tags=["vector stores"], dependencies=[Depends(principal)])
    most = settings.retrieval.max_batch_files

    async def requested(store: VectorStore, body: BatchIn) -> list[Attach]:
        """The files a request asks for, each checked, or a 400 naming the first bad one."""
        if body.file_ids is not None and body.files is not None:
            raise BadRequestError("'file_ids' and 'files' are mutually exclusive.",
                                  param="files")
        if body.files is not None:
            for name in ("attributes", "chunking_strategy"):
                if getattr(body, name) is not None:
                    raise BadRequestError(f"With 'files', give '{name}' for each file.",
                                          param=name)
            wanted = [(f.file_id, f"files[{i}]", f.attributes, f.chunking_strategy)
                      for i, f in enumerate(body.files)]
        else:
            wanted = [(fid, f"file_ids[{i}]", body.attributes, body.chunking_strategy)
                      for i, fid in enumerate(body.file_ids or [])]
        which = "files" if body.files is not None else "file_ids"
        if not wanted:
            raise BadRequestError("A file batch needs 'file_ids' or 'files' with at least one "
                                  "file.", param=which)
        if len(wanted) > most:
            raise BadRequestError(f"A file batch may attach at most {most} files; this one "
                                  f"has {len(wanted)}.", param=which)
        found = await ingestion.files.get_many(store.tenant_id, [w[0] for w in wanted])
        seen: set[str] = set()
        out = []
        for file_id, at, attributes, chunking in wanted:
            param = at if which == "file_ids" else f"{at}.file_id"
            if file_id in seen:
                raise BadRequestError(f"File {file_id} is named twice in the batch.",
                                      param=param)
            seen.add(file_id)
            if file_id not in found:
                raise BadRequestError(f"File {file_id} not found.", param=param)
            prefix = "" if which == "file_ids" else f"{at}."
            out.append(Attach(found[file_id], attributes or {},
                              ingestion.chunking(chunking, prefix)))
        return out

    async def owned(store: VectorStore, batch_id: str) -> VectorStoreFileBatch:
        try:
            return await stores.get_batch(store.tenant_id, store.id, batch_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="batch_id") from None

    @router.post("")
    async def create(request: Request, store_id: str, body: BatchIn) -> dict[str, Any]:
        store = await ingestion.store(request, store_id)
        files = await requested(store, body)
        batch, attached = await stores.create_batch(store, files,
                                                    request.state.principal.key_id)
        await ingestion.queue(store, attached)
        return await batch_out(stores, batch)

    @router.get("/{batch_id}")
    async def retrieve(request: Request, store_id: str, batch_id: str) -> dict[str, Any]:
        store = await ingestion.store(request, store_id)
        return await batch_out(stores, await owned(store, batch_id))

    @router.post("/{batch_id}/cancel")
    async def cancel(request: Request, store_id: str, batch_id: str) -> dict[str, Any]:
        store = await ingestion.store(request, store_id)
        await owned(store, batch_id)
        return await batch_out(stores, await stores.cancel_batch(store.tenant_id, store.id,
                                                                 batch_id))

    @router.get("/{batch_id}/files")
    async def list_files(request: Request, store_id: str, batch_id: str, limit: int = 20,
                         after: str | None = None, filter: str | None = None,
                         order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        if filter is not None and filter not in FILE_STATUSES:
            raise BadRequestError(f"'filter' must be one of {list(FILE_STATUSES)}.",
                                  param="filter")
        store = await ingestion.store(request, store_id)
        batch = await owned(store, batch_id)
        try:
            rows, more = await stores.list_files(store.tenant_id, store.id,
                                                 limit=bounded(limit), after=after,
                                                 status=filter, order=order, batch_id=batch.id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return page([file_out(r) for r in rows], more)

    return router
