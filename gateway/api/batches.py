"""OpenAI's Batch API: `POST/GET /v1/batches`, `GET /v1/batches/{id}`,
`POST /v1/batches/{id}/cancel`. Batches belong to the caller's tenant; their output and error
files are read through the Files API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from batches import BatchIn, BatchService
from gateway.http.auth import Authenticated
from gateway.http.paging import bounded, page
from gateway.http.timestamps import epoch
from llmops.store import Batch

__all__ = ["batch_out", "batches_router"]

_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
          "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def batch_out(batch: Batch) -> dict[str, Any]:
    # OpenAI's schema has `errors`, the output and error files and each status's time as
    # optional, never null: a batch without them leaves them out.
    optional = {"errors": {"object": "list", "data": batch.errors} if batch.errors else None,
                "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
                **{name: epoch(getattr(batch, name)) for name in _TIMES}}
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status,
        **{name: value for name, value in optional.items() if value is not None},
        "request_counts": {"total": batch.total, "completed": batch.completed,
                           "failed": batch.failed},
        "metadata": batch.metadata_,
    }


def batches_router(service: BatchService, principal: Authenticated) -> APIRouter:
    router = APIRouter(prefix="/v1/batches", tags=["batches"],
                       dependencies=[Depends(principal)])

    @router.post("")
    async def create(request: Request, body: BatchIn) -> dict[str, Any]:
        return batch_out(await service.create(request.state.principal, body))

    @router.get("")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None
                           ) -> dict[str, Any]:
        rows, more = await service.list_batches(request.state.principal, limit=bounded(limit),
                                        after=after)
        return page([batch_out(b) for b in rows], more)

    @router.get("/{batch_id}")
    async def retrieve(request: Request, batch_id: str) -> dict[str, Any]:
        return batch_out(await service.get(request.state.principal, batch_id))

    @router.post("/{batch_id}/cancel")
    async def cancel(request: Request, batch_id: str) -> dict[str, Any]:
        return batch_out(await service.cancel(request.state.principal, batch_id))

    return router
