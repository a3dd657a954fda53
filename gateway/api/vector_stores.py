"""OpenAI's vector stores API: `POST/GET/DELETE /v1/vector_stores[/{id}]`,
`POST/GET/DELETE /v1/vector_stores/{id}/files[/{file_id}]` and
`POST /v1/vector_stores/{id}/search`. Our additions are named as such, on search:
`search_mode` (`hybrid`, `dense` or `sparse`) and `include_chunk` (each result's chunk index
and character offsets, which OpenAI's closed result object has no room for: asked for only).

Attaching a file (alone, with a new store, or in a file batch: `Ingestion` is the one path)
records the attaching key, whose limits and ledger the ingestion's embedding calls use, and
queues its ingestion on the `ingest` queue. The gateway owns the vector index: ingestion
workers parse, chunk and embed, then hand the finished points to the internal
`PUT /internal/vector_stores/{id}/files/{file_id}/points`, which replaces the file's chunks in
one step and marks it completed.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal

import numpy as np
from celery import Celery
from fastapi import APIRouter, Depends, Request
from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

import tenancy
from gateway.http.auth import Authenticated, require_admin
from gateway.http.body import read_body
from gateway.http.paging import bounded, page
from gateway.http.timestamps import epoch
from gateway.tasks import enqueue
from llmops.errors import BadRequestError, ConflictError, NotFoundError, ServiceUnavailableError
from llmops.files import Files
from llmops.settings import Settings
from llmops.store import StoredFile, VectorStore, VectorStoreFile
from llmops.wire import Wire
from retrieval import (
    Chunk,
    ChunkingStrategy,
    InvalidChunkingError,
    Point,
    SparseVector,
)
from retrieval.grounding import Caller, Retriever
from retrieval.stores import FILE_STATUSES, VectorStores
from workers.app import INGEST_TASK

__all__ = ["Ingestion", "file_out", "internal_router", "store_out", "vector_stores_router"]

Attribute = StrictStr | StrictInt | StrictFloat | StrictBool
Attributes = Annotated[dict[Annotated[str, Field(max_length=64)], Attribute],
                       Field(max_length=16)]


class StoreIn(Wire):
    name: str | None = Field(None, max_length=256)
    file_ids: list[str] = Field(default_factory=list, max_length=500)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)
    chunking_strategy: dict[str, Any] | None = None


class StorePatch(Wire):
    name: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, max_length=16)


class FileIn(Wire):
    file_id: str
    attributes: Attributes = Field(default_factory=dict)
    chunking_strategy: dict[str, Any] | None = None


class RankingOptions(Wire):
    ranker: Literal["auto", "default-2024-11-15", "none"] = "auto"
    score_threshold: float = Field(0.0, ge=0, le=1)


class SearchIn(Wire):
    query: str | list[str]
    filters: dict[str, Any] | None = None
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions = Field(default_factory=RankingOptions)
    rewrite_query: bool = False
    search_mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    include_chunk: bool = Field(False, description="Ours: give each result a `chunk` (its "
                                "index in the file and its character offsets), outside "
                                "OpenAI's schema of a result.")


class PointIn(BaseModel):
    chunk: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    text: str
    dense: str  # base64 of little-endian float32, as vLLM's `encoding_format=base64`
    sparse_indices: list[int]
    sparse_values: list[float]


class PointsIn(BaseModel):
    content_sha256: str
    points: list[PointIn]


async def store_out(stores: VectorStores, row: VectorStore) -> dict[str, Any]:
    counts, usage = await stores.file_counts(row.id)
    # Stores do not expire here: no `expires_after` (OpenAI's is an object when present,
    # never null); an unnamed store's name is empty (OpenAI's is a string, never null).
    return {"id": row.id, "object": "vector_store", "name": row.name or "",
            "created_at": epoch(row.created_at), "last_active_at": epoch(row.last_active_at),
            "status": "in_progress" if counts["in_progress"] else "completed",
            "usage_bytes": usage, "file_counts": counts, "metadata": row.metadata_,
            "expires_at": None}


def file_out(row: VectorStoreFile) -> dict[str, Any]:
    return {"id": row.file_id, "object": "vector_store.file", "vector_store_id": row.store_id,
            "created_at": epoch(row.created_at), "status": row.status,
            "usage_bytes": row.usage_bytes, "last_error": row.last_error,
            "attributes": row.attributes, "chunking_strategy": {"type": "static", "static": {
                "max_chunk_size_tokens": row.chunking.get("max_tokens"),
                "chunk_overlap_tokens": row.chunking.get("overlap_tokens")}}}


class Ingestion:
    """Attached files on their way to the ingestion workers: one path for files attached
    alone, with a new store, or in a file batch."""

    def __init__(self, settings: Settings, stores: VectorStores, files: Files, celery: Celery
                 ) -> None:
        self.stores = stores
        self.files = files
        self.celery = celery
        embedding = settings.embedding_model()
        # A chunk's tokens plus the two special tokens the embedder adds must fit its context.
        self.context = (embedding.context_length if embedding else 512) - 2

    def chunking(self, obj: dict[str, Any] | None, param: str = "") -> dict[str, int]:
        """A request's `chunking_strategy` (at `param`, a prefix) as stored, or a 400."""
        try:
            chosen = ChunkingStrategy.from_request(obj, self.context)
        except InvalidChunkingError as exc:
            raise BadRequestError(str(exc), param=param + exc.param) from None
        return {"max_tokens": chosen.max_tokens, "overlap_tokens": chosen.overlap_tokens}

    async def store(self, request: Request, store_id: str) -> VectorStore:
        """The caller's tenant's store; another tenant's is missing (404)."""
        try:
            return await self.stores.get(request.state.principal.tenant_id, store_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="vector_store_id") from None

    async def file(self, tenant_id: str, file_id: str, param: str) -> StoredFile:
        """A file of the tenant, to attach; another tenant's is missing (400 naming `param`)."""
        try:
            return await self.files.get(tenant_id, file_id)
        except tenancy.NotFoundError:
            raise BadRequestError(f"File {file_id} not found.", param=param) from None

    async def queue(self, store: VectorStore, attached: list[tuple[VectorStoreFile, bool]]
                    ) -> list[VectorStoreFile]:
        """Queue the ingestion of the attached files that need one; a file the queue refused
        fails, as a file that could not be read would. Returns the rows as they now are."""
        rows = []
        for row, wanted in attached:
            if wanted:
                try:
                    await enqueue(self.celery, INGEST_TASK, [store.id, row.file_id])
                except ServiceUnavailableError as exc:
                    await self.stores.finish(store.id, row.file_id, row.content_sha256, error={
                        "code": "server_error",
                        "message": f"{exc.message} Attach the file again."})
                    row = await self.stores.get_file(store.tenant_id, store.id, row.file_id)
            rows.append(row)
        return rows


def vector_stores_router(stores: VectorStores, ingestion: Ingestion, retriever: Retriever,
                         principal: Authenticated) -> APIRouter:
    router = APIRouter(prefix="/v1/vector_stores", tags=["vector stores"],
                       dependencies=[Depends(principal)])
    strategy, owned = ingestion.chunking, ingestion.store

    async def attach(request: Request, store: VectorStore, file_id: str,
                     attributes: dict[str, Any], chunking: dict[str, int], param: str
                     ) -> VectorStoreFile:
        file = await ingestion.file(store.tenant_id, file_id, param)
        attached = await stores.attach(store, file, attributes, chunking,
                                       request.state.principal.key_id)
        return (await ingestion.queue(store, [attached]))[0]

    @router.post("")
    async def create(request: Request, body: StoreIn) -> dict[str, Any]:
        chunking = strategy(body.chunking_strategy)
        tenant_id = request.state.principal.tenant_id
        for i, file_id in enumerate(body.file_ids):  # refuse before creating anything
            await ingestion.file(tenant_id, file_id, f"file_ids[{i}]")
        row = await stores.create(tenant_id, body.name, body.metadata)
        for i, file_id in enumerate(body.file_ids):
            await attach(request, row, file_id, {}, chunking, f"file_ids[{i}]")
        return await store_out(stores, row)

    @router.get("")
    async def list_stores(request: Request, limit: int = 20, after: str | None = None,
                          order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        try:
            rows, more = await stores.list_stores(request.state.principal.tenant_id,
                                           limit=bounded(limit), after=after, order=order)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return page([await store_out(stores, r) for r in rows], more)

    @router.get("/{store_id}")
    async def retrieve(request: Request, store_id: str) -> dict[str, Any]:
        return await store_out(stores, await owned(request, store_id))

    @router.post("/{store_id}")
    async def modify(request: Request, store_id: str, body: StorePatch) -> dict[str, Any]:
        row = await owned(request, store_id)
        changes = body.model_dump(exclude_unset=True)
        if "metadata" in changes:
            changes["metadata_"] = changes.pop("metadata") or {}
        return await store_out(stores, await stores.update(row.tenant_id, row.id, **changes))

    @router.delete("/{store_id}")
    async def delete(request: Request, store_id: str) -> dict[str, Any]:
        row = await owned(request, store_id)
        await stores.delete(row.tenant_id, row.id)
        await asyncio.to_thread(retriever.index.delete_store, row.id)
        return {"id": row.id, "object": "vector_store.deleted", "deleted": True}

    @router.post("/{store_id}/files")
    async def add_file(request: Request, store_id: str, body: FileIn) -> dict[str, Any]:
        store = await owned(request, store_id)
        chunking = strategy(body.chunking_strategy)
        return file_out(await attach(request, store, body.file_id, body.attributes, chunking,
                                     "file_id"))

    @router.get("/{store_id}/files")
    async def list_files(request: Request, store_id: str, limit: int = 20,
                         after: str | None = None, filter: str | None = None,
                         order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        if filter is not None and filter not in FILE_STATUSES:
            raise BadRequestError(f"'filter' must be one of {list(FILE_STATUSES)}.",
                                  param="filter")
        store = await owned(request, store_id)
        try:
            rows, more = await stores.list_files(store.tenant_id, store.id,
                                                 limit=bounded(limit), after=after,
                                                 status=filter, order=order)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return page([file_out(r) for r in rows], more)

    @router.get("/{store_id}/files/{file_id}")
    async def get_file(request: Request, store_id: str, file_id: str) -> dict[str, Any]:
        store = await owned(request, store_id)
        try:
            return file_out(await stores.get_file(store.tenant_id, store.id, file_id))
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="file_id") from None

    @router.delete("/{store_id}/files/{file_id}")
    async def remove_file(request: Request, store_id: str, file_id: str) -> dict[str, Any]:
        store = await owned(request, store_id)
        try:
            await stores.detach(store.tenant_id, store.id, file_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="file_id") from None
        await asyncio.to_thread(retriever.index.delete_file, store.id, file_id)
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    @router.post("/{store_id}/search")
    async def search(request: Request, store_id: str, body: SearchIn) -> dict[str, Any]:
        queries = [body.query] if isinstance(body.query, str) else body.query
        if not queries or len(queries) > 8:
            raise BadRequestError("'query' must hold 1 to 8 queries.", param="query")
        sources = await retriever.search(
            Caller(request.state.principal, request.state.request_id), [store_id], queries,
            limit=body.max_num_results, filters=body.filters, mode=body.search_mode,
            threshold=body.ranking_options.score_threshold, ranker=body.ranking_options.ranker)
        data = [{"file_id": s.file_id, "filename": s.filename, "score": s.score,
                 "attributes": s.attributes, "content": [{"type": "text", "text": s.text}]}
                for s in sources]
        if body.include_chunk:  # OpenAI closes a result's properties: only when asked for
            for result, s in zip(data, sources, strict=True):
                result["chunk"] = {"index": s.chunk, "start": s.start, "end": s.end}
        return {"object": "vector_store.search_results.page", "search_query": queries,
                "has_more": False, "next_page": None, "data": data}

    return router


def internal_router(settings: Settings, stores: VectorStores, retriever: Retriever,
                    principal: Authenticated) -> APIRouter:
    """Endpoints for our own workers, admin keys only."""
    router = APIRouter(prefix="/internal", tags=["internal"], include_in_schema=False,
                       dependencies=[Depends(principal), Depends(require_admin)])

    @router.put("/vector_stores/{store_id}/files/{file_id}/points")
    async def put_points(request: Request, store_id: str, file_id: str) -> dict[str, Any]:
        try:
            body = PointsIn.model_validate_json(
                await read_body(request, settings.retrieval.max_points_bytes))
        except ValidationError as exc:
            raise BadRequestError(f"Invalid points: {exc.errors()[0]['msg']}") from None
        row = await stores.pending(store_id, file_id)
        if row is None or row.content_sha256 != body.content_sha256:
            raise ConflictError("This file is no longer waiting for this content.")
        filename = (await stores.filenames([file_id])).get(file_id, "")
        points = [_point(row, filename, p) for p in body.points]
        await asyncio.to_thread(retriever.index.replace_file, row.tenant_id, store_id, file_id,
                                points)
        usage = sum(len(p.text.encode()) for p in body.points)
        # No lock is needed against a detach: whichever of the two finishes second wins,
        # and a file detached while we wrote has its chunks taken back out here.
        if not await stores.finish(store_id, file_id, body.content_sha256,
                                   chunks=len(points), usage_bytes=usage):
            await asyncio.to_thread(retriever.index.delete_file, store_id, file_id)
            raise ConflictError("This file was detached during ingestion.")
        return {"chunks": len(points)}

    return router


def _point(row: VectorStoreFile, filename: str, p: PointIn) -> Point:
    dense = np.frombuffer(base64.b64decode(p.dense), dtype="<f4").tolist()
    return Point.for_chunk(
        tenant=row.tenant_id, store=row.store_id, file=row.file_id, filename=filename,
        attributes=row.attributes, content_hash=row.content_sha256,
        chunk=Chunk(p.chunk, p.start, p.end, p.text), dense=dense,
        sparse=SparseVector(indices=p.sparse_indices, values=p.sparse_values))
