"""OpenAI's Responses API: `POST /v1/responses` (served by `ResponsesService` through the
inference pipeline), `GET/DELETE /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`,
`GET /v1/responses/{id}/input_items` and `POST /v1/responses/input_tokens`."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

import tenancy
from conversations import InvalidItemError, Responses, normalize_input
from conversations.store import TERMINAL
from gateway.http.auth import Authenticated
from gateway.http.body import read_body
from gateway.http.paging import bounded, page
from gateway.inference.pipeline import parse_request
from gateway.inference.upstream import Upstream
from gateway.responses.live import LiveStreams
from gateway.responses.protocol import ResponsesRequest
from gateway.responses.service import RESPONSES, ResponsesService
from gateway.responses.translate import chat_request
from llmops.catalog import Catalog
from llmops.errors import BadRequestError, ModelNotFoundError, NotFoundError
from llmops.store import StoredResponse
from tenancy.visibility import may_see

__all__ = ["responses_router"]

def responses_router(service: ResponsesService, responses: Responses, live: LiveStreams,
                     upstream: Upstream, catalog: Catalog, principal: Authenticated,
                     max_body_bytes: int) -> APIRouter:
    router = APIRouter(prefix="/v1/responses", tags=["responses"],
                       dependencies=[Depends(principal)])

    async def owned(request: Request, response_id: str) -> StoredResponse:
        try:
            return await responses.get(request.state.principal.tenant_id, response_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="response_id") from None

    @router.post("", summary=RESPONSES.summary, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{ResponsesRequest.__name__}"}}}}})
    async def create(request: Request) -> Response:
        return await service.create(request)

    @router.post("/input_tokens")
    async def input_tokens(request: Request) -> dict[str, Any]:
        """How many tokens the input of a response would take (as the model counts them)."""
        req = parse_request(ResponsesRequest, await read_body(request, max_body_bytes))
        entry = catalog.resolve(req.model)
        if entry is None or not may_see(catalog, request.state.principal, entry):
            raise ModelNotFoundError(req.model)
        try:
            items = normalize_input(req.input)
        except InvalidItemError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None
        context = await service.context(request.state.principal, req)
        count, _ = await upstream.count_tokens(
            entry, chat_request(req, context + items)["messages"])
        return {"object": "response.input_tokens", "input_tokens": count}

    @router.get("/{response_id}")
    async def retrieve(request: Request, response_id: str, stream: bool = False,
                       starting_after: int | None = None) -> Response:
        row = await owned(request, response_id)
        if not stream:
            return Response(orjson.dumps(row.body), media_type="application/json")
        if not row.body.get("background"):
            raise BadRequestError("Only background responses can be streamed again.",
                                  param="stream")
        return live.stream(request, row.tenant_id, row.id, starting_after)

    @router.delete("/{response_id}")
    async def delete(request: Request, response_id: str) -> dict[str, Any]:
        row = await owned(request, response_id)
        await responses.delete(row.tenant_id, row.id)
        return {"id": row.id, "object": "response.deleted", "deleted": True}

    @router.post("/{response_id}/cancel")
    async def cancel(request: Request, response_id: str) -> dict[str, Any]:
        row = await owned(request, response_id)
        if not row.body.get("background"):
            raise BadRequestError("Only background responses can be cancelled.",
                                  param="response_id")
        if row.status in TERMINAL and row.status != "cancelled":
            raise BadRequestError(f"The response is already {row.status}.",
                                  param="response_id")
        row = await responses.set_status(row.tenant_id, row.id, "cancelled",
                                         frozenset({"queued", "in_progress"}))
        return dict(row.body)

    @router.get("/{response_id}/input_items")
    async def input_items(request: Request, response_id: str, limit: int = 20,
                          after: str | None = None,
                          order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        row = await owned(request, response_id)
        items = row.input_items if order == "asc" else row.input_items[::-1]
        if after is not None:
            at = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise NotFoundError(f"No input item with id '{after}'.", param="after")
            items = items[at + 1:]
        shown = items[:bounded(limit)]
        return page(shown, len(items) > len(shown))

    return router
