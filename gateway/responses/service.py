"""Creating responses: the context a request continues (a stored chain or a conversation),
its input as items, truncation to the model's context, then the chat pipeline with a
`ResponseBuilder` showing the answer; the finished response is stored and appended to its
conversation after the answer has gone out."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

import tenancy
from conversations import (
    Conversations,
    InvalidItemError,
    Responses,
    duplicate_id,
    normalize_input,
    output_as_input,
)
from conversations.background import RESPONSE_ID_HEADER
from conversations.items import duplicate_message
from gateway.http.body import read_body
from gateway.inference.pipeline import Endpoint, Pipeline, parse_request
from gateway.inference.protocol import ChatCompletionRequest
from gateway.inference.upstream import Upstream
from gateway.responses.answer import ResponseBuilder, new_response_id, response_object
from gateway.responses.live import LiveStreams
from gateway.responses.protocol import ResponsesRequest
from gateway.responses.translate import chat_request
from llmops.catalog import Catalog
from llmops.errors import BadRequestError, NotFoundError
from tenancy import Principal

__all__ = ["RESPONSES", "ResponsesService"]

log = logging.getLogger(__name__)

RESPONSES = Endpoint("/v1/responses", ChatCompletionRequest, "chat",
                     "Creates a model response.", upstream="/v1/chat/completions")

Enqueue = Callable[[str], Awaitable[None]]


class ResponsesService:
    def __init__(self, pipeline: Pipeline, upstream: Upstream, catalog: Catalog,
                 responses: Responses, conversations: Conversations, max_chain: int,
                 max_body_bytes: int, enqueue: Enqueue, live: LiveStreams) -> None:
        self.pipeline = pipeline
        self.upstream = upstream
        self.catalog = catalog
        self.responses = responses
        self.conversations = conversations
        self.max_chain = max_chain
        self.max_body_bytes = max_body_bytes
        self.enqueue = enqueue
        self.live = live

    async def create(self, request: Request) -> Response:
        who: Principal = request.state.principal
        raw = await read_body(request, self.max_body_bytes)
        req = parse_request(ResponsesRequest, raw)
        if req.previous_response_id is not None and req.conversation is not None:
            raise BadRequestError("Use either 'previous_response_id' or 'conversation', not "
                                  "both.", param="previous_response_id")
        if req.background and not req.store:
            raise BadRequestError("A background response must be stored: 'store' cannot be "
                                  "false.", param="store")
        try:
            new_items = normalize_input(req.input)
        except InvalidItemError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None
        context = await self.context(who, req)
        if req.conversation_id is not None and (
                duplicate := duplicate_id(new_items, (i["id"] for i in context))) is not None:
            raise BadRequestError(duplicate_message(duplicate), param="input")
        response_id = request.headers.get(RESPONSE_ID_HEADER)
        if response_id is not None:  # a worker computes a queued background response
            if not (who.delegated or who.is_admin):  # our workers act for its creator
                raise BadRequestError(f"Only workers may set {RESPONSE_ID_HEADER}.",
                                      param=RESPONSE_ID_HEADER)
            try:
                await self.responses.get(who.tenant_id, response_id)
            except tenancy.NotFoundError as exc:
                raise NotFoundError(str(exc), param=RESPONSE_ID_HEADER) from None
            await self.responses.set_status(who.tenant_id, response_id, "in_progress",
                                            frozenset({"queued"}))
            req = req.model_copy(update={"background": True})  # as its creator asked
        elif req.background:
            return await self._queue(request, who, req, raw, new_items)
        body = chat_request(req, context + new_items)
        body["messages"] = await self._fit(req, body["messages"])
        builder = ResponseBuilder(req, response_id or new_response_id(),
                                  lambda final: self._finished(who, req, final, new_items))
        return await self.pipeline.serve(request, RESPONSES, orjson.dumps(body), builder)

    async def context(self, who: Principal, req: ResponsesRequest) -> list[dict[str, Any]]:
        """The items a request continues, oldest first."""
        items: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            try:
                chain = await self.responses.chain(who.tenant_id, req.previous_response_id,
                                                   self.max_chain)
            except tenancy.NotFoundError as exc:
                raise NotFoundError(str(exc), param="previous_response_id") from None
            except tenancy.ConflictError as exc:
                raise BadRequestError(str(exc), param="previous_response_id") from None
            for row in chain:
                items += row.input_items + output_as_input(row.body.get("output") or [])
        elif (conversation := req.conversation_id) is not None:
            try:
                rows, _ = await self.conversations.items(who.tenant_id, conversation)
            except tenancy.NotFoundError as exc:
                raise NotFoundError(str(exc), param="conversation") from None
            items = [r.item for r in rows if r.item.get("type") in (
                "message", "function_call", "function_call_output")]
        return items

    async def _fit(self, req: ResponsesRequest, messages: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
        """The messages, fitted to the model's context as `truncation` says: "auto" drops
        the oldest items (never the instructions or the last one), "disabled" refuses."""
        entry = self.catalog.resolve(req.model)
        if entry is None:
            return messages  # the pipeline answers for an unknown model
        reserve = req.max_output_tokens or 1
        # A token is at least one byte: a prompt this short fits without asking the engine.
        if len(orjson.dumps(messages)) + reserve <= entry.base.context_length:
            return messages
        head = 1 if req.instructions else 0
        while True:
            count, context = await self.upstream.count_tokens(entry, messages)
            if count + reserve <= context:
                return messages
            if req.truncation == "disabled" or len(messages) - head <= 1:
                raise BadRequestError(
                    f"The input is {count} tokens; with {reserve} output tokens it does not "
                    f"fit the model's context of {context} tokens. Shorten the input or set "
                    "truncation to 'auto'.", param="input", code="context_length_exceeded")
            drop = head + 1
            # A tool reply goes with the call before it.
            while drop < len(messages) - 1 and messages[drop]["role"] == "tool":
                drop += 1
            messages = messages[:head] + messages[drop:]

    async def _queue(self, request: Request, who: Principal, req: ResponsesRequest, raw: bytes,
                     new_items: list[dict[str, Any]]) -> Response:
        """A background response: stored as queued, computed by a worker as its creator;
        with `stream`, its events are followed as the worker produces them."""
        response_id = new_response_id()
        queued = response_object(req, response_id, int(time.time()), status="queued")
        await self.responses.save(who.tenant_id, who.key_id, queued, new_items,
                                  request=orjson.loads(raw))
        await self.live.announce(queued)
        try:
            await self.enqueue(response_id)
        except Exception:
            await self.responses.delete(who.tenant_id, response_id)  # nothing left queued
            raise
        if req.stream:
            return self.live.stream(request, who.tenant_id, response_id, None)
        return Response(orjson.dumps(queued), media_type="application/json")

    def _finished(self, who: Principal, req: ResponsesRequest, final: dict[str, Any],
                  new_items: list[dict[str, Any]]) -> None:
        if req.store:
            self.responses.save_later(who.tenant_id, who.key_id, final, new_items)
        if (conversation := req.conversation_id) is not None:
            added = new_items + list(final["output"])
            self.conversations.append_later(who.tenant_id, conversation, added)
