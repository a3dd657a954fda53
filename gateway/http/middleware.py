"""Plain ASGI middleware (no BaseHTTPMiddleware: it would buffer and break context)."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.errors import api_error_response
from llmops.errors import APIError, error_body

__all__ = ["REQUEST_ID_HEADER", "BodyLimitMiddleware", "InferenceRoutes", "RequestIdMiddleware"]

Handler = Callable[[Request], Awaitable[Response]]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(rb"^[\x21-\x7e]{1,128}$")  # printable ASCII, bounded: safe to log and echo


class RequestIdMiddleware:
    """Gives every response an `x-request-id` (the client's, when it sent a sane one), and turns
    any unhandled exception into a 500 in OpenAI's error shape instead of a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value if _VALID_ID.match(value) else b""
                break
        if not rid:
            rid = uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", rid.decode())
            if started:
                raise
            await send_with_id({
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"application/json")],
            })
            await send({
                "type": "http.response.body",
                "body": error_body("The server had an error processing your request.",
                                   "server_error"),
            })


class BodyLimitMiddleware:
    """Refuses a request whose declared body exceeds the limit before anything reads it (413
    in OpenAI's shape); some paths (file uploads, workers' writes) have limits of their own,
    by path prefix. Bodies without a length are counted as they arrive by their readers."""

    def __init__(self, app: ASGIApp, max_bytes: int, by_prefix: dict[str, int]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.by_prefix = by_prefix

    def limit(self, path: str) -> int:
        return next((n for p, n in self.by_prefix.items() if path.startswith(p)),
                    self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            limit = self.limit(scope["path"])
            for name, value in scope["headers"]:
                if name == b"content-length":
                    if value.isdigit() and int(value) > limit:
                        body = error_body(
                            f"Request body of {int(value)} bytes exceeds the limit of "
                            f"{limit} bytes.", "invalid_request_error",
                            code="request_too_large")
                        await send({"type": "http.response.start", "status": 413,
                                    "headers": [(b"content-type", b"application/json")]})
                        await send({"type": "http.response.body", "body": body})
                        return
                    break
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class _Matched:
    path: str


class InferenceRoutes:
    """Serves POSTs to the inference endpoints directly, past FastAPI's router, dependency
    injection and exception middleware: they cost a fifth of the gateway's CPU per request,
    and these endpoints need none of it (they authenticate, parse and answer by themselves).
    The same endpoints stay declared as FastAPI routes for the OpenAPI schema; this sits
    inside the request-id, body-limit and tracing middleware, so those still apply."""

    def __init__(self, app: ASGIApp, endpoints: dict[str, Handler]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = _Matched(scope["path"])  # what a router would note, for the span
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except APIError as exc:
            response = api_error_response(exc)
        await response(scope, receive, send)
