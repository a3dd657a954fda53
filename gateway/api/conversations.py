"""OpenAI's Conversations API: `POST /v1/conversations`, `GET/POST/DELETE
/v1/conversations/{id}`, `GET/POST /v1/conversations/{id}/items` and
`GET/DELETE /v1/conversations/{id}/items/{item_id}`. A response created with `conversation`
reads its items as context and appends its input and output."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

import tenancy
from conversations import Conversations, DuplicateItemError, InvalidItemError, normalize_input
from gateway.http.auth import Authenticated
from gateway.http.paging import bounded, page
from gateway.http.timestamps import epoch
from llmops.errors import BadRequestError, NotFoundError
from llmops.store import Conversation
from llmops.wire import Metadata, Wire

__all__ = ["conversations_router"]


class ConversationIn(Wire):
    items: list[dict[str, Any]] | None = Field(None, max_length=20)
    metadata: Metadata | None = None


class ConversationPatch(Wire):
    metadata: Metadata


class ItemsIn(Wire):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=20)
    include: list[str] | None = None


def conversation_out(row: Conversation) -> dict[str, Any]:
    return {"id": row.id, "object": "conversation", "created_at": epoch(row.created_at),
            "metadata": row.metadata_}


def conversations_router(conversations: Conversations, principal: Authenticated) -> APIRouter:
    router = APIRouter(prefix="/v1/conversations", tags=["conversations"],
                       dependencies=[Depends(principal)])

    def items_of(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return normalize_input(value, "items")
        except InvalidItemError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None

    async def owned(request: Request, conversation_id: str) -> Conversation:
        try:
            return await conversations.get(request.state.principal.tenant_id, conversation_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="conversation_id") from None

    @router.post("")
    async def create(request: Request, body: ConversationIn) -> dict[str, Any]:
        try:
            row = await conversations.create(request.state.principal.tenant_id,
                                             body.metadata or {}, items_of(body.items or []))
        except DuplicateItemError as exc:
            raise BadRequestError(str(exc), param="items") from None
        return conversation_out(row)

    @router.get("/{conversation_id}")
    async def retrieve(request: Request, conversation_id: str) -> dict[str, Any]:
        return conversation_out(await owned(request, conversation_id))

    @router.post("/{conversation_id}")
    async def update(request: Request, conversation_id: str, body: ConversationPatch
                     ) -> dict[str, Any]:
        row = await owned(request, conversation_id)
        return conversation_out(await conversations.update(row.tenant_id, row.id,
                                                           body.metadata))

    @router.delete("/{conversation_id}")
    async def delete(request: Request, conversation_id: str) -> dict[str, Any]:
        row = await owned(request, conversation_id)
        await conversations.delete(row.tenant_id, row.id)
        return {"id": row.id, "object": "conversation.deleted", "deleted": True}

    @router.get("/{conversation_id}/items")
    async def list_items(request: Request, conversation_id: str, limit: int = 20,
                         after: str | None = None, order: Literal["asc", "desc"] = "desc"
                         ) -> dict[str, Any]:
        row = await owned(request, conversation_id)
        try:
            rows, more = await conversations.items(row.tenant_id, row.id,
                                                   limit=bounded(limit), after=after,
                                                   order=order)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return page([r.item for r in rows], more)

    @router.post("/{conversation_id}/items")
    async def add_items(request: Request, conversation_id: str, body: ItemsIn
                        ) -> dict[str, Any]:
        row = await owned(request, conversation_id)
        try:
            added = await conversations.append(row.tenant_id, row.id, items_of(body.items))
        except tenancy.ConflictError as exc:
            raise BadRequestError(str(exc), param="items") from None
        return page([r.item for r in added], False)

    @router.get("/{conversation_id}/items/{item_id}")
    async def retrieve_item(request: Request, conversation_id: str, item_id: str
                            ) -> dict[str, Any]:
        row = await owned(request, conversation_id)
        try:
            return dict((await conversations.item(row.tenant_id, row.id, item_id)).item)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="item_id") from None

    @router.delete("/{conversation_id}/items/{item_id}")
    async def delete_item(request: Request, conversation_id: str, item_id: str
                          ) -> dict[str, Any]:
        row = await owned(request, conversation_id)
        try:
            await conversations.delete_item(row.tenant_id, row.id, item_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="item_id") from None
        return conversation_out(row)

    return router
