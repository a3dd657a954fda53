"""Forwarding OpenAI requests to vLLM replicas: pick, send, retry connection failures on
another replica, and relay the answer (streams chunk by chunk, never buffered)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.http.errors import api_error_response
from gateway.inference.accounting import Account, Accountant, SseUsageTap
from gateway.inference.grounding import Retriever
from gateway.inference.protocol import ChatCompletionRequest, OpenAIRequest
from gateway.inference.spans import upstream_span
from gateway.routing import Replica, Router
from gateway.routing.policy import RouteRequest
from guardrails import OFF, GuardrailBlockedError, Guardrails, OutputFilter
from llmops.catalog import Catalog, CatalogEntry
from llmops.errors import (
    APIError,
    BadRequestError,
    ModelNotFoundError,
    NoHealthyBackendError,
    RequestTooLargeError,
    UpstreamError,
    UpstreamTimeoutError,
    error_body,
)
from llmops.settings import Settings
from observability import tracing

__all__ = ["POOL_HEADER", "Endpoint", "Proxy", "read_body"]

log = logging.getLogger(__name__)

POOL_HEADER = "x-llmops-pool"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_SCAN_INLINE_BYTES = 64 * 1024
# Replica failures that happen before vLLM produced any response: safe to try elsewhere.
_RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
              aiohttp.ClientOSError)


@dataclass(frozen=True)
class Endpoint:
    path: str
    schema: type[OpenAIRequest]
    kind: str  # the model kind this endpoint serves


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all (a declared
    length over the limit was refused already by `BodyLimitMiddleware`)."""
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
        accountant: Accountant,
    ) -> None:
        self.settings = settings
        self.accountant = accountant
        self.catalog = catalog
        self.routers = routers
        self.session = session
        self.retriever: Retriever | None = None  # set when vector stores are available
        self.guardrails = Guardrails(settings.guardrails)
        cfg = settings.routing
        self.max_attempts = cfg.max_attempts
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
        )

    async def forward(self, request: Request, endpoint: Endpoint) -> Response:
        """Serve one OpenAI request; whatever happens, its account is closed exactly once."""
        account = self.accountant.open(request.state.principal, request.state.request_id,
                                       endpoint.path)
        request.state.account = account  # the request's span reads it when the request ends
        try:
            response = await self._forward(request, endpoint, account)
        except APIError as exc:
            account.close(exc.status)
            raise
        except BaseException:
            account.close(500)
            raise
        if not isinstance(response, RelayResponse):  # a stream closes it when it ends
            account.close(response.status_code)
        return response

    async def _forward(self, request: Request, endpoint: Endpoint, account: Account
                       ) -> Response:
        body = await read_body(request, self.settings.max_body_bytes)
        parsed = parse_request(endpoint.schema, body)
        request.state.parsed = parsed
        account.model = parsed.model
        entry = self.catalog.resolve(parsed.model)
        who = account.who
        if (entry is None or not who.may_use(entry.name)
                or not self.catalog.visible_to(entry, who.tenant_id, who.is_admin,
                                               who.delegated)):
            raise ModelNotFoundError(parsed.model)  # the same answer: no information leak
        if entry.base.kind != endpoint.kind:
            raise BadRequestError(
                f"The model `{parsed.model}` is a {entry.base.kind} model and cannot be used "
                f"with {endpoint.path}.", param="model", code="model_not_supported")
        admission = await self.accountant.admit(account, entry, parsed, len(body))
        tap = None
        changes: dict[str, Any] = {}
        policy = self.guardrails.policy(who) if endpoint.kind == "chat" else OFF
        original: dict[str, Any] | None = None  # the body as JSON, once parsed
        if policy.looks_at_input:
            original = orjson.loads(body)
            check = functools.partial(self.guardrails.check_input, policy, original,
                                      account.guardrails)
            try:  # a big prompt is scanned off the event loop (tens of ms per MB)
                redacted = (await asyncio.to_thread(check) if len(body) > _SCAN_INLINE_BYTES
                            else check())
            except GuardrailBlockedError:
                request.state.parsed = None  # a span capturing content must not keep it
                raise
            if redacted:
                changes.update(redacted)
                parsed = parse_request(endpoint.schema, orjson.dumps({**original, **redacted}))
                request.state.parsed = parsed  # what the model is sent, for the span
        output = self.guardrails.output_filter(policy, account.guardrails)
        grounding = None
        if isinstance(parsed, ChatCompletionRequest) and parsed.retrieval is not None:
            if self.retriever is None:
                raise BadRequestError("Retrieval is not available: no embedding model is "
                                      "configured.", param="retrieval")
            grounding = await self.retriever.ground(who.tenant_id, parsed)
            if policy.retrieval_injection != "off" or output is not None:
                screened = self.guardrails.screen(policy, grounding.sources,
                                                  account.guardrails)
                grounding = grounding.screened(screened.kept, screened.dropped,
                                               output.quote if output is not None else None)
            if not grounding.sources:
                return grounding.no_answer(parsed)
            messages = changes.get("messages") or (original or orjson.loads(body))["messages"]
            changes["messages"] = grounding.messages(messages)
        if entry.upstream_name != parsed.model:
            changes["model"] = entry.upstream_name
        if parsed.stream:
            # Always ask vLLM for usage, continuously, so that every stream is counted even
            # when it is cut short; the tap shows the client only what it asked for.
            asked = parsed.stream_options.model_dump() if parsed.stream_options else {}
            tap = SseUsageTap(account, client_usage=bool(asked.get("include_usage")),
                              client_continuous=bool(asked.get("continuous_usage_stats")),
                              guard=output)
            if not (tap.client_usage and tap.client_continuous):
                changes["stream_options"] = {**asked, "include_usage": True,
                                             "continuous_usage_stats": True}
        if changes:
            payload = {**(original or orjson.loads(body)), **changes}
            payload.pop("retrieval", None)  # ours, not vLLM's
            body = orjson.dumps(payload)

        headers = {"content-type": "application/json", "x-request-id": account.request_id}
        response = await _unless_disconnected(
            request, self._call(entry, endpoint.path, body, headers, account, tap, output))
        if response is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        if account.started_record is not None:  # sent while the model worked: long done
            await asyncio.shield(account.started_record)
        if grounding is not None:
            if isinstance(response, RelayResponse):
                response.trailer = grounding.trailer(parsed.model)
            else:
                response = grounding.with_citations(response)
        response.headers.update(admission.headers)
        return response

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Embeddings for the gateway's own use (search queries), through the same routing
        and failover as clients' requests."""
        entry = self.catalog.resolve(model)
        if entry is None or entry.base.kind != "embedding":
            raise ModelNotFoundError(model)
        body = orjson.dumps({"model": entry.upstream_name, "input": texts})
        replica, resp = await self._dispatch(entry, "/v1/embeddings", body,
                                             {"content-type": "application/json"})
        try:
            data = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            replica.release(ok=False)
            raise UpstreamError("The embedding backend failed.") from None
        finally:
            resp.release()
        replica.release(ok=resp.status < 500)
        if resp.status != 200:
            raise UpstreamError(f"The embedding backend answered {resp.status}: "
                                f"{data[:300].decode(errors='replace')}")
        rows = sorted(orjson.loads(data)["data"], key=lambda d: d["index"])
        return [r["embedding"] for r in rows]

    async def _call(
        self, entry: CatalogEntry, path: str, body: bytes, headers: dict[str, str],
        account: Account, tap: SseUsageTap | None, output: OutputFilter | None = None,
    ) -> Response:
        replica, resp = await self._dispatch(entry, path, body, headers)
        account.pool, account.device = replica.config, replica.device
        served = {POOL_HEADER: replica.device}
        if tap is not None and resp.status == 200:
            return RelayResponse(resp, replica, {**_SSE_HEADERS, **served}, tap)
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
            return _upstream_error(resp.status, data, served, account.model)
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = None
        if output is not None:  # an answer that cannot be checked is not sent
            if not isinstance(answer, dict):
                raise UpstreamError("The model backend sent an answer that is not JSON.")
            output.answer(answer)
            data = orjson.dumps(answer)
        with contextlib.suppress(AttributeError, LookupError, TypeError):
            account.usage_from(answer.get("usage"))
            account.note_finish(answer.get("choices"))
            if account.probe is not None:  # drift detection looks at the answer's start
                choice = answer["choices"][0]
                account.probe.add_output(str((choice.get("message") or {}).get("content")
                                             or choice.get("text") or ""))
        return Response(data, status_code=resp.status, media_type="application/json",
                        headers=served)

    async def _dispatch(
        self, entry: CatalogEntry, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        router = self.routers[entry.base.name]
        observer = self.accountant.observer
        tried: set[int] = set()
        for _ in range(self.max_attempts):
            replica = router.choose(RouteRequest(entry.adapter, frozenset(tried)))
            if replica is None:
                break
            if tried and observer is not None:
                observer.retried(entry.name)
            replica.acquire()
            try:
                resp = await self._post(replica, path, body, headers, entry.upstream_name)
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
            if observer is not None and replica.config is not None:
                observer.dispatched(entry.name, replica.config)
            return replica, resp
        raise NoHealthyBackendError(
            f"No healthy backend is available for model `{entry.name}`. Try again later."
        )

    async def _post(self, replica: Replica, path: str, body: bytes, headers: dict[str, str],
                    model: str) -> aiohttp.ClientResponse:
        """One attempt at calling a replica: a CLIENT span, whose context vLLM receives."""
        with upstream_span(replica, path, model) as span:
            if span is not None:
                headers = tracing.inject({**headers})
            resp = await self.session.post(replica.url + path, data=body, headers=headers,
                                           timeout=self.timeout)
            if span is not None:
                span.set_attribute("http.response.status_code", resp.status)
                if resp.status >= 500:
                    tracing.failed(span, str(resp.status))
            return resp


async def _on_disconnect(receive: Receive, callback: Callable[[], object]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    callback()


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, Response]
                               ) -> Response | None:
    """Run `work` unless the client disconnects first, in which case it is cancelled (which
    closes the upstream connection, so vLLM stops generating for nobody) and None returned."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(work)
    listener = loop.create_task(_on_disconnect(request.receive, task.cancel))
    try:
        return await task
    except asyncio.CancelledError:
        if listener.done() and not listener.cancelled():
            return None
        task.cancel()  # we are cancelled ourselves (shutdown)
        raise
    finally:
        listener.cancel()


class RelayResponse(StreamingResponse):
    """Relays vLLM's SSE events as they arrive, through a usage tap. A client disconnect closes
    the upstream connection at once, even while vLLM is silent; a backend failure mid-stream
    becomes an error event followed by `data: [DONE]`. The replica and the account are settled
    whatever happens."""

    def __init__(self, resp: aiohttp.ClientResponse, replica: Replica, headers: dict[str, str],
                 tap: SseUsageTap) -> None:
        self.resp = resp
        self.replica = replica
        self.tap = tap
        self.trailer = b""  # an event to send just before `data: [DONE]`
        self.finished = self.delivered = self.failed = self.client_left = False
        super().__init__(self._chunks(), media_type="text/event-stream", headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        account = self.tap.account
        try:
            async for chunk in self.resp.content.iter_any():
                if out := self.tap.feed(chunk):
                    account.first_byte()
                    done = b"data: [DONE]" in out
                    if self.trailer and done:
                        out = out.replace(b"data: [DONE]", self.trailer + b"data: [DONE]", 1)
                    yield out
                    # Sent: a client that hangs up now, before vLLM closes, got everything.
                    self.delivered = self.delivered or done
            if rest := self.tap.tail():
                yield rest
            self.finished = True
        except (TimeoutError, aiohttp.ClientError) as exc:
            if self.client_left:
                return
            self.failed = True
            if isinstance(exc, TimeoutError):
                yield _error_event("The model backend stopped sending in time.",
                                   "timeout_error", "upstream_timeout")
            else:
                yield _error_event("The model backend failed while streaming.",
                                   "upstream_error", "bad_gateway")

    def _on_client_left(self) -> None:
        self.client_left = True
        self.resp.close()  # vLLM sees the connection drop and aborts the generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = asyncio.get_running_loop().create_task(
            _on_disconnect(receive, self._on_client_left))
        try:
            with contextlib.suppress(OSError):  # the client left while we wrote
                await self.stream_response(send)
        finally:
            listener.cancel()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            if self.finished:
                self.resp.release()  # the connection goes back to the pool
            else:
                self.resp.close()
            self.replica.release(ok=not self.failed)
            status = 200 if self.finished or self.delivered else 502 if self.failed else 499
            self.tap.account.close(status)


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
        return api_error_response(exc, headers)
    if status == 404:
        return api_error_response(ModelNotFoundError(model), headers)
    body = error_body(message or "The request was rejected by the model backend.",
                      "invalid_request_error", param=param if isinstance(param, str) else None,
                      code=code if isinstance(code, (str, int)) else None)
    return Response(body, status_code=status if status < 500 else 502,
                    media_type="application/json", headers=headers)
