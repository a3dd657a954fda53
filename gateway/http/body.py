"""Reading a request's body within a limit."""

from __future__ import annotations

from starlette.requests import Request

from llmops.errors import RequestTooLargeError

__all__ = ["read_body"]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all (a declared
    length over the limit was refused already by `BodyLimitMiddleware`)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLargeError(f"Request body exceeds the limit of {limit} bytes.")
    return bytes(body)
