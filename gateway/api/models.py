"""`/v1/models`: the models and adapters a key may use, as OpenAI lists them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request

from gateway.inference.pipeline import EnsureModel
from llmops.catalog import Catalog, CatalogEntry
from llmops.errors import ModelNotFoundError
from tenancy.visibility import may_see

__all__ = ["models_router"]


def models_router(catalog: Catalog, ensure: EnsureModel | None = None) -> APIRouter:
    router = APIRouter(prefix="/v1/models", tags=["models"])

    def item(e: CatalogEntry) -> dict[str, Any]:
        # `kind` is ours: which endpoints take the model (chat, or embeddings only).
        out: dict[str, Any] = {"id": e.name, "object": "model", "created": e.created,
                               "owned_by": e.base.owned_by, "kind": e.base.kind}
        if e.adapter is not None:
            out["parent"] = e.base.name
            out.update(catalog.details.get(e.name, {}))
        return out

    @router.get("")
    async def list_models(request: Request) -> dict[str, Any]:
        who = request.state.principal
        return {"object": "list",
                "data": [item(e) for e in catalog.entries() if may_see(catalog, who, e)]}

    @router.get("/{model:path}")
    async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
        if ensure is not None:  # a published adapter is retrievable, as it is usable, at once
            await ensure(request.state.principal, model)
        entry = catalog.resolve(model)
        if entry is None or not may_see(catalog, request.state.principal, entry):
            raise ModelNotFoundError(model)
        return item(entry)

    return router
