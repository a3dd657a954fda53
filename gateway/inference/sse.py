"""Relaying an engine's server-sent events to the client: each event goes through the answer
hooks as it arrives (never buffered), a client that leaves closes the upstream connection at
once, and a backend failure mid-stream becomes an error event followed by `data: [DONE]`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.inference.context import RequestContext
from gateway.inference.hooks import CHANGED, DROP, Hooks
from gateway.routing import Replica
from llmops.errors import error_body

__all__ = ["SSE_HEADERS", "AnswerTranslator", "RelayResponse", "SseRelay", "as_chunks",
           "unless_disconnected"]

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_DONE = b"data: [DONE]"
_T = TypeVar("_T")


class AnswerTranslator(Protocol):
    """Shows a chat answer, after the hooks, in another API's shape (the Responses API)."""

    def whole(self, ctx: RequestContext, answer: dict[str, Any]) -> dict[str, Any]: ...

    def chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> bytes: ...

    def done(self, ctx: RequestContext) -> bytes: ...

    def failed(self, ctx: RequestContext, message: str, code: str) -> bytes: ...

    def left(self, ctx: RequestContext) -> None: ...


class SseRelay:
    """Cuts a byte stream into events and passes each `data: {...}` event through the hooks:
    usage is read from every event, an event a hook changed is sent re-encoded, one it dropped
    is not sent, and what the hooks flush at the answer's end goes out just before the final
    usage chunk (or `[DONE]`), so that the usage chunk stays last, as OpenAI sends it. With
    a translator, the events it makes of each chunk are sent instead."""

    def __init__(self, ctx: RequestContext, hooks: Hooks,
                 translator: AnswerTranslator | None = None) -> None:
        self.ctx = ctx
        self.hooks = hooks
        self.translator = translator
        self._partial = b""
        self._flushed = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._partial = data
            return b""
        complete, self._partial = data[: end + 2], data[end + 2:]
        out: list[bytes] = []
        for event in complete.split(b"\n\n")[:-1]:
            if event.startswith(b"data: {"):
                try:
                    obj = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    out.append(event + b"\n\n")
                    continue
                if "usage" in obj:
                    self.ctx.usage_from(obj["usage"])
                if obj.get("choices") == []:  # the final usage chunk: the answer has ended
                    self._flush(out)
                verdict = self.hooks.on_data(self.ctx, obj, False)
                if verdict == DROP:
                    continue
                if self.translator is not None:
                    out.append(self.translator.chunk(self.ctx, obj))
                    continue
                out.append((b"data: " + orjson.dumps(obj) if verdict == CHANGED else event)
                           + b"\n\n")
            else:
                if event == _DONE:
                    self._flush(out)
                    if self.translator is not None:
                        out.append(self.translator.done(self.ctx))
                        continue
                if self.translator is None:
                    out.append(event + b"\n\n")
        return b"".join(out)

    def tail(self) -> bytes:
        """What is left when the engine's stream ends (without `[DONE]`, if it was cut)."""
        out: list[bytes] = []
        self._flush(out)
        rest, self._partial = self._partial, b""
        return b"".join(out) + rest

    def failed(self, message: str, type_: str, code: str) -> bytes:
        """The last event of a stream whose engine failed."""
        if self.translator is not None:
            return self.translator.failed(self.ctx, message, code)
        return b"data: " + error_body(message, type_, code=code) + b"\n\n" + _DONE + b"\n\n"

    def left(self) -> None:
        """The client left before the answer ended."""
        if self.translator is not None:
            self.translator.left(self.ctx)

    def _flush(self, out: list[bytes]) -> None:
        if not self._flushed:
            self._flushed = True
            for obj in self.hooks.flush(self.ctx):
                out.append(self.translator.chunk(self.ctx, obj) if self.translator is not None
                           else b"data: " + orjson.dumps(obj) + b"\n\n")


class RelayResponse(StreamingResponse):
    """A stream from a replica to the client through an `SseRelay`. The replica and the
    request's context are settled whatever happens."""

    def __init__(self, resp: aiohttp.ClientResponse, replica: Replica, headers: dict[str, str],
                 relay: SseRelay) -> None:
        self.resp = resp
        self.replica = replica
        self.relay = relay
        self.finished = self.delivered = self.failed = self.client_left = False
        super().__init__(self._chunks(), media_type="text/event-stream", headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        ctx = self.relay.ctx
        try:
            async for chunk in self.resp.content.iter_any():
                if out := self.relay.feed(chunk):
                    ctx.first_byte()
                    yield out
                    # Sent: a client that hangs up now, before vLLM closes, got everything.
                    self.delivered = self.delivered or _DONE in out
            if rest := self.relay.tail():
                yield rest
            self.finished = True
        except (TimeoutError, aiohttp.ClientError) as exc:
            if self.client_left:
                return
            self.failed = True
            if isinstance(exc, TimeoutError):
                yield self.relay.failed("The model backend stopped sending in time.",
                                        "timeout_error", "upstream_timeout")
            else:
                yield self.relay.failed("The model backend failed while streaming.",
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
            if self.client_left and not (self.finished or self.delivered):
                self.relay.left()
            status = 200 if self.finished or self.delivered else 502 if self.failed else 499
            self.relay.ctx.close(status)


async def _on_disconnect(receive: Receive, callback: Callable[[], object]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    callback()


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, _T]) -> _T | None:
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


def as_chunks(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole chat answer that no engine streamed (the gateway's own) as stream chunks: the
    text, the finish, then the answer's other fields (citations) in a chunk of their own."""
    head: dict[str, Any] = {k: answer[k] for k in ("id", "created", "model") if k in answer}
    head["object"] = "chat.completion.chunk"
    choices = answer.get("choices") or []
    extra = {k: v for k, v in answer.items()
             if k not in ("id", "object", "created", "model", "choices", "usage")}
    return [
        {**head, "choices": [{"index": c.get("index", 0), "finish_reason": None, "delta": {
            k: v for k, v in (c.get("message") or {}).items() if v is not None}}
            for c in choices]},
        {**head, "choices": [{"index": c.get("index", 0), "delta": {},
                              "finish_reason": c.get("finish_reason")} for c in choices]},
        {**head, "choices": [], **extra},
    ]
