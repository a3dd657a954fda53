"""One inference request, top to bottom: read and validate the body, resolve the model the
caller may use, run the hooks before the call, call an engine, pass its answer (whole or
streamed) through the same hooks, and end the request exactly once, however it ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from gateway.http.body import read_body
from gateway.http.errors import api_error_response
from gateway.inference.context import RequestContext
from gateway.inference.hooks import KEEP, Hook, Hooks
from gateway.inference.protocol import OpenAIRequest
from gateway.inference.sse import (
    SSE_HEADERS,
    AnswerTranslator,
    RelayResponse,
    SseRelay,
    as_chunks,
    unless_disconnected,
)
from gateway.inference.upstream import Upstream
from gateway.routing.flow import Claim
from llmops.catalog import Catalog
from llmops.errors import (
    APIError,
    BadRequestError,
    ModelNotFoundError,
    UpstreamError,
    error_body,
)
from tenancy.priority import PRIORITY_HEADER, Priority
from tenancy.tenants import Principal
from tenancy.visibility import usable_entry

__all__ = ["POOL_HEADER", "REPLICA_HEADER", "SESSION_HEADER", "Endpoint", "EnsureModel", "Pipeline",
           "parse_request", "session_key"]

log = logging.getLogger(__name__)

POOL_HEADER = "x-llmops-pool"
REPLICA_HEADER = "x-llmops-replica"  # the serving replica's place in its pool's URL list
SESSION_HEADER = "x-session-id"
_M = TypeVar("_M", bound=BaseModel)
# Called with the caller and the model it names before the model is looked up: loads a
# published fine-tuned adapter this gateway does not serve yet (gateway.routing.adapters).
EnsureModel = Callable[[Principal, str], Awaitable[None]]


@dataclass(frozen=True)
class Endpoint:
    path: str
    schema: type[OpenAIRequest]
    kind: str  # the model kind this endpoint serves
    summary: str = ""
    upstream: str | None = None  # the engines' path, when another API translates into it

    @property
    def engine_path(self) -> str:
        return self.upstream or self.path


class Pipeline:
    def __init__(self, catalog: Catalog, upstream: Upstream, hooks: Sequence[Hook],
                 max_body_bytes: int, ensure: EnsureModel | None = None) -> None:
        self.catalog = catalog
        self.ensure = ensure
        self.upstream = upstream
        self.hooks = Hooks(hooks)
        self.max_body_bytes = max_body_bytes

    async def serve(self, request: Request, endpoint: Endpoint, body: bytes | None = None,
                    translator: AnswerTranslator | None = None) -> Response:
        """Serve one request of an authenticated caller (`request.state.principal`): the
        request's body, or `body` made of it by another API, whose `translator` then shows
        the answer."""
        ctx = RequestContext(request.state.principal, request.state.request_id, endpoint.path,
                             endpoint.kind, self.hooks.after)
        request.state.context = ctx  # the request's span reads it when the request ends
        try:
            response = await self._serve(request, endpoint, ctx, body, translator)
        except APIError as exc:
            ctx.close(exc.status)
            raise
        except BaseException:
            ctx.close(500)
            raise
        if not isinstance(response, RelayResponse):  # a stream closes it when it ends
            ctx.close(response.status_code)
        return response

    async def _serve(self, request: Request, endpoint: Endpoint, ctx: RequestContext,
                     body: bytes | None, translator: AnswerTranslator | None) -> Response:
        try:
            ctx.priority = Priority.parse(request.headers.get(PRIORITY_HEADER))
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        ctx.body = body if body is not None else await read_body(request, self.max_body_bytes)
        ctx.parsed = parsed = parse_request(endpoint.schema, ctx.body)
        if parsed.model_extra and "priority" in parsed.model_extra:
            ctx.removed.add("priority")  # vLLM's; the class header sets it, never the body
        ctx.model = parsed.model
        if self.ensure is not None:
            await self.ensure(ctx.who, parsed.model)
        ctx.entry = entry = usable_entry(self.catalog, ctx.who, parsed.model, endpoint.kind,
                                         endpoint.path)
        if entry.upstream_name != parsed.model:
            ctx.changes["model"] = entry.upstream_name
        if (answered := await self.hooks.before(ctx)) is not None:
            return _own_answer(ctx, answered, translator)
        headers = {"content-type": "application/json", "x-request-id": ctx.request_id}
        response = await unless_disconnected(
            request, self._call(ctx, endpoint.engine_path, ctx.upstream_body(), headers,
                                translator, session_key(parsed, request.headers)))
        if response is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        for started in ctx.before_answer:  # started while the model worked: long done
            await asyncio.shield(started)
        response.headers.update(ctx.response_headers)
        return response

    async def _call(self, ctx: RequestContext, path: str, body: bytes,
                    headers: dict[str, str], translator: AnswerTranslator | None,
                    session: str | None) -> Response:
        assert ctx.entry is not None and ctx.parsed is not None
        replica, resp = await self.upstream.dispatch(
            ctx.entry, path, body, headers, ctx.parsed,
            Claim(ctx.who.tenant_id, ctx.who.weight, ctx.priority), session)
        ctx.pool, ctx.device = replica.config, replica.device
        served = {POOL_HEADER: replica.device, REPLICA_HEADER: str(replica.index)}
        if ctx.parsed.stream and resp.status == 200:
            relay = SseRelay(ctx, self.hooks, translator)
            return RelayResponse(resp, replica, {**SSE_HEADERS, **served}, relay)
        data = await self.upstream.read(replica, resp)
        if resp.status >= 400:
            return _upstream_error(resp.status, data, served, ctx.model)
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = None
        if isinstance(answer, dict):
            ctx.usage_from(answer.get("usage"))
            if self.hooks.on_data(ctx, answer, True) != KEEP or translator is not None:
                data = orjson.dumps(answer if translator is None
                                    else translator.whole(ctx, answer))
        elif ctx.output is not None or translator is not None:
            # An answer that cannot be checked (or shown in the client's API) is not sent.
            raise UpstreamError("The model backend sent an answer that is not JSON.")
        return Response(data, status_code=resp.status, media_type="application/json",
                        headers=served)


def _own_answer(ctx: RequestContext, answer: dict[str, Any],
                translator: AnswerTranslator | None) -> Response:
    """An answer a hook gave in the model's place, whole or streamed as the client asked."""
    assert ctx.parsed is not None
    if not ctx.parsed.stream:
        shown = answer if translator is None else translator.whole(ctx, answer)
        return Response(orjson.dumps(shown), media_type="application/json")
    chunks = as_chunks(answer)
    if translator is not None:
        body = b"".join(translator.chunk(ctx, c) for c in chunks) + translator.done(ctx)
    else:
        body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) \
            + b"data: [DONE]\n\n"
    return Response(body, media_type="text/event-stream", headers=SSE_HEADERS)


def session_key(parsed: OpenAIRequest, headers: Mapping[str, str]) -> str | None:
    """What keeps a conversation on one replica: OpenAI's `prompt_cache_key`, else the
    x-session-id header."""
    key = (parsed.model_extra or {}).get("prompt_cache_key")
    return key if isinstance(key, str) and key else headers.get(SESSION_HEADER) or None


def parse_request(schema: type[_M], body: bytes) -> _M:
    try:
        return schema.model_validate_json(body)
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
        return api_error_response(UpstreamError(
            f"The model backend failed: {message[:500]}" if message else
            "The model backend failed."), headers)
    if status == 404:
        return api_error_response(ModelNotFoundError(model), headers)
    # vLLM puts the HTTP status in `code`; OpenAI's codes are names (or null).
    body = error_body(message or "The request was rejected by the model backend.",
                      "invalid_request_error", param=param if isinstance(param, str) else None,
                      code=code if isinstance(code, str) else None)
    return Response(body, status_code=status, media_type="application/json", headers=headers)
