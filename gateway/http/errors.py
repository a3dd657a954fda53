"""The one mapping from errors to responses in OpenAI's envelope,
`{"error": {"message", "type", "param", "code"}}` with the matching HTTP status: llmops'
own errors (`llmops.errors`), FastAPI's validation errors and Starlette's HTTP errors."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from llmops.errors import APIError, error_body

__all__ = ["api_error_response", "error_response", "install_error_handlers"]

def api_error_response(exc: APIError, headers: dict[str, str] | None = None) -> Response:
    return error_response(
        exc.status, exc.message, exc.type, param=exc.param, code=exc.code,
        headers={**(exc.headers or {}), **(headers or {})} or None,
    )


def error_response(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        error_body(message, type_, param=param, code=code),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return api_error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _loc_to_param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid request")
        message = f"{param}: {msg}" if param else str(msg)
        return error_response(400, message, "invalid_request_error", param=param)

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(
            exc.status_code,
            str(exc.detail),
            _HTTP_TYPES.get(exc.status_code, "server_error"),
            headers=dict(exc.headers or {}),
        )

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
