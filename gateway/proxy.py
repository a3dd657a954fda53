"""Forwarding OpenAI requests to vLLM replicas: pick, send, retry connection failures on
another replica, and relay the answer (streams chunk by chunk, never buffered)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import (
    APIError,
    BadRequestError,
    ModelNotFoundError,
    NoHealthyBackendError,
    RequestTooLargeError,
    UpstreamError,
    UpstreamTimeoutError,
    error_body,
)
from gateway.protocol import OpenAIRequest
from gateway.routing import Replica, Router
from gateway.routing.policy import RouteRequest
from llmops.catalog import Catalog, CatalogEntry
from llmops.settings import Settings

__all__ = ["POOL_HEADER", "Endpoint", "Proxy", "read_body"]

log = logging.getLogger(__name__)

POOL_HEADER = "x-llmops-pool"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# Replica failures that happen before vLLM produced any response: safe to try elsewhere.
_RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
              aiohttp.ClientOSError)


@dataclass(frozen=True)
class Endpoint:
    path: str
    schema: type[OpenAIRequest]
    kind: str  # the model kind this endpoint serves


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"Request body of {declared} bytes exceeds the limit of "
                                   f"{limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLargeError(f"Request body exceeds the limit of {limit} bytes.")
    return bytes(body)


def parse_request(schema: type[BaseModel], body: bytes) -> OpenAIRequest:
    try:
        parsed = schema.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise BadRequestError(
                "We could not parse the JSON body of your request. Expected a JSON object."
            ) from None
        if err["type"] == "model_type" and not err["loc"]:
            raise BadRequestError("The request body must be a JSON object.") from None
        param = _param(err["loc"])
        raise BadRequestError(f"Invalid value for '{param}': {err['msg']}.", param=param) from None
    assert isinstance(parsed, OpenAIRequest)
    return parsed


_UNION_BRANCHES = {"str", "int", "float", "bool"}


def _param(loc: tuple[int | str, ...]) -> str:
    """`messages[0].role` from pydantic's ('messages', 0, 'role'), leaving out the labels it
    adds for union branches ('str', 'list[str]', ...)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _UNION_BRANCHES and "[" not in part:
            out += f".{part}" if out else part
    return out


class Proxy:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        routers: dict[str, Router],
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.routers = routers
        self.session = session
        cfg = settings.routing
        self.max_attempts = cfg.max_attempts
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
        )

    async def forward(self, request: Request, endpoint: Endpoint) -> Response:
        body = await read_body(request, self.settings.max_body_bytes)
        parsed = parse_request(endpoint.schema, body)
        entry = self.catalog.resolve(parsed.model)
        if entry is None:
            raise ModelNotFoundError(parsed.model)
        if entry.base.kind != endpoint.kind:
            raise BadRequestError(
                f"The model `{parsed.model}` is a {entry.base.kind} model and cannot be used "
                f"with {endpoint.path}.", param="model", code="model_not_supported")
        if entry.upstream_name != parsed.model:
            body = orjson.dumps({**orjson.loads(body), "model": entry.upstream_name})

        headers = {"content-type": "application/json"}
        if request_id := request.scope.get("state", {}).get("request_id"):
            headers["x-request-id"] = request_id
        async with ClientWatch(request.receive):
            return await self._call(entry, endpoint.path, body, headers, bool(parsed.stream),
                                    parsed.model)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    async def _call(
        self, entry: CatalogEntry, path: str, body: bytes, headers: dict[str, str],
        stream: bool, model: str,
    ) -> Response:
        replica, resp = await self._dispatch(entry, path, body, headers)
        served = {POOL_HEADER: replica.device}
        if stream and resp.status == 200:
            return RelayResponse(resp, replica, headers={**_SSE_HEADERS, **served})
        try:
            data = await resp.read()
        except TimeoutError:
            replica.release(ok=False)
            raise UpstreamTimeoutError("The model backend did not answer in time.") from None
        except aiohttp.ClientError:
            replica.release(ok=False)
            raise UpstreamError("The model backend closed the connection.") from None
        except BaseException:  # cancelled: the client left
            resp.close()
            replica.release(ok=True)
            raise
        finally:
            resp.release()
        replica.release(ok=resp.status < 500)
        if resp.status >= 400:
            return _upstream_error(resp.status, data, served, model)
        return Response(data, status_code=resp.status, media_type="application/json",
                        headers=served)

    async def _dispatch(
        self, entry: CatalogEntry, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        router = self.routers[entry.base.name]
        tried: set[int] = set()
        for _ in range(self.max_attempts):
            replica = router.choose(RouteRequest(entry.adapter, frozenset(tried)))
            if replica is None:
                break
            replica.acquire()
            try:
                resp = await self.session.post(
                    replica.url + path, data=body, headers=headers, timeout=self.timeout
                )
            except _RETRYABLE as exc:
                replica.release(ok=False)
                if isinstance(exc, aiohttp.ClientConnectorError):
                    replica.circuit.trip()  # nothing listens there: stop sending at once
                log.warning("replica %s failed (%s); trying another", replica.url,
                            type(exc).__name__)
                tried.add(id(replica))
                continue
            except TimeoutError:
                replica.release(ok=False)
                raise UpstreamTimeoutError("The model backend did not answer in time.") from None
            except BaseException:
                replica.release(ok=True)  # cancelled by the client, not the replica's fault
                raise
            return replica, resp
        raise NoHealthyBackendError(
            f"No healthy backend is available for model `{entry.name}`. Try again later."
        )


class ClientWatch:
    """Cancels the current task when the client disconnects, and swallows that cancellation
    on the way out: a client that leaves stops the upstream call (aiohttp closes the
    connection, so vLLM aborts the generation) instead of letting vLLM generate for nobody."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.client_left = False
        self._task = asyncio.current_task()
        self._listener: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ClientWatch:
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        return self

    async def _listen(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.client_left = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        assert self._listener is not None and self._task is not None
        self._listener.cancel()
        if self.client_left and exc_type is asyncio.CancelledError:
            self._task.uncancel()
            return True
        return False


class RelayResponse(StreamingResponse):
    """Relays vLLM's SSE bytes as they arrive. It listens for the client leaving while it
    streams, so a disconnect closes the upstream connection even while vLLM is silent, and it
    settles the replica whatever happens. A backend failure mid-stream becomes an error event
    followed by `data: [DONE]`."""

    def __init__(self, resp: aiohttp.ClientResponse, replica: Replica,
                 headers: dict[str, str]) -> None:
        self.resp = resp
        self.replica = replica
        self.finished = False
        self.failed = False
        super().__init__(self._chunks(), media_type="text/event-stream", headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.resp.content.iter_any():
                yield chunk
            self.finished = True
        except TimeoutError:
            self.failed = True
            yield _error_event("The model backend stopped sending in time.", "timeout_error",
                               "upstream_timeout")
        except aiohttp.ClientError:
            self.failed = True
            yield _error_event("The model backend failed while streaming.", "upstream_error",
                               "bad_gateway")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with ClientWatch(receive):
                with contextlib.suppress(OSError):  # the client left while we wrote
                    await self.stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            if self.finished:
                self.resp.release()  # back to the pool for the next request
            else:
                self.resp.close()  # drop the connection: vLLM sees the disconnect and aborts
            self.replica.release(ok=not self.failed)


def _error_event(message: str, type_: str, code: str) -> bytes:
    return b"data: " + error_body(message, type_, code=code) + b"\n\ndata: [DONE]\n\n"


def _upstream_error(status: int, data: bytes, headers: dict[str, str], model: str) -> Response:
    """vLLM's error answers, always in OpenAI's envelope; 5xx become 502."""
    try:
        payload = orjson.loads(data)
        err = payload.get("error", payload) if isinstance(payload, dict) else {}
        message = str(err.get("message") or "")
        param, code = err.get("param"), err.get("code")
    except orjson.JSONDecodeError:
        message, param, code = "", None, None
    if status >= 500:
        exc: APIError = UpstreamError(
            f"The model backend failed: {message[:500]}" if message else
            "The model backend failed.")
        return exc.to_response(headers)
    if status == 404:
        return ModelNotFoundError(model).to_response(headers)
    body = error_body(message or "The request was rejected by the model backend.",
                      "invalid_request_error", param=param if isinstance(param, str) else None,
                      code=code if isinstance(code, (str, int)) else None)
    return Response(body, status_code=status if status < 500 else 502,
                    media_type="application/json", headers=headers)
