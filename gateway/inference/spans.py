"""The gateway's spans: one SERVER span per `/v1` request, with OpenTelemetry's GenAI
attributes for inference, and one CLIENT span per attempt at an upstream call.

The server span continues the client's trace (`traceparent`) and ends when the response's
last byte is sent, so a stream's span covers the whole stream and holds its token usage. It
reads what the request left in its state: the principal, the request id, and for inference
the request's context (model, parsed request, pool, usage, finish reasons). Only used while
tracing is on (see `observability.tracing`).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.inference.context import RequestContext
from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from gateway.routing import Replica
from guardrails import redact, scan
from observability import tracing

__all__ = ["OPERATIONS", "PROVIDER", "TracingMiddleware", "upstream_span"]

# GenAI semantic conventions: the operation of each endpoint, and the provider serving it.
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion",
              "/v1/embeddings": "embeddings", "/v1/responses": "chat"}
PROVIDER = "vllm"
_MAX_CAPTURED_BYTES = 1 << 20  # a captured answer beyond this is left out, not cut
_OFF: AbstractContextManager[None] = contextlib.nullcontext()


class TracingMiddleware:
    """Plain ASGI (BaseHTTPMiddleware would end the span when the handler returns, before a
    stream is sent)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        status = 500  # what the request-id middleware answers if the app raises
        body: bytearray | None = bytearray() if tracing.capture_content() else None

        async def observe(message: Message) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif body is not None and message["type"] == "http.response.body":
                body += message.get("body", b"")
                if len(body) > _MAX_CAPTURED_BYTES:
                    body = None
            await send(message)

        with tracing.span(method, kind=SpanKind.SERVER,
                          context=tracing.extract(scope["headers"]),
                          attributes={"http.request.method": method, "url.path": scope["path"],
                                      "url.scheme": scope.get("scheme", "http")}) as span:
            try:
                await self.app(scope, receive, observe)
            finally:
                if span is not None:
                    _finish(span, scope, status, bytes(body) if body is not None else None)


def _finish(span: Span, scope: Scope, status: int, body: bytes | None) -> None:
    state: dict[str, Any] = scope.get("state") or {}
    attrs: dict[str, AttributeValue] = {"http.response.status_code": status}
    if request_id := state.get("request_id"):
        attrs["llmops.request.id"] = request_id
    if (principal := state.get("principal")) is not None:
        attrs["llmops.tenant.id"] = principal.tenant_id
    if route := getattr(scope.get("route"), "path", None):
        attrs["http.route"] = route
        span.update_name(f"{scope['method']} {route}")
    if status >= 500:
        attrs["error.type"] = str(status)
        span.set_status(StatusCode.ERROR)
    ctx: RequestContext | None = state.get("context")
    if ctx is not None and (operation := OPERATIONS.get(ctx.endpoint)):
        parsed = ctx.parsed
        span.update_name(f"{operation} {ctx.model}" if ctx.model else operation)
        attrs.update(_inference(operation, ctx, parsed))
        if tracing.capture_content() and parsed is not None:
            attrs.update(_content(parsed, body, status))
    span.set_attributes(attrs)


def _inference(operation: str, account: RequestContext, parsed: OpenAIRequest | None
               ) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {"gen_ai.operation.name": operation,
                                        "gen_ai.provider.name": PROVIDER}
    if account.model:
        attrs["gen_ai.request.model"] = account.model
    if isinstance(parsed, ChatCompletionRequest | CompletionRequest):
        max_tokens = getattr(parsed, "max_completion_tokens", None) or parsed.max_tokens
        for key, value in (("max_tokens", max_tokens), ("temperature", parsed.temperature),
                           ("top_p", parsed.top_p)):
            if value is not None:
                attrs[f"gen_ai.request.{key}"] = value
    if account.device is not None:  # a replica answered
        if account.entry is not None:
            attrs["gen_ai.response.model"] = account.entry.name
        attrs["gen_ai.usage.input_tokens"] = account.prompt_tokens
        if operation != "embeddings":
            attrs["gen_ai.usage.output_tokens"] = account.completion_tokens
        attrs["llmops.device"] = account.device
        if account.pool is not None:
            attrs["llmops.pool.priority"] = account.pool.priority
    if account.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = account.finish_reasons
    return attrs


def _content(parsed: OpenAIRequest, body: bytes | None, status: int
             ) -> dict[str, AttributeValue]:
    """Prompt and answer as `gen_ai.input.messages` / `gen_ai.output.messages` (opt-in),
    with sensitive data redacted whatever the guardrail policy: traces are not the place for
    it."""
    def text(content: str) -> dict[str, str]:
        return {"type": "text", "content": _scrub(content)}

    if isinstance(parsed, ChatCompletionRequest):
        inputs = [{"role": m.role, "parts": [text(m.content)] if isinstance(m.content, str)
                   else [text(p["text"]) if p.get("type") == "text" else {"type": p.get("type")}
                         for p in m.content or ()]} for m in parsed.messages]
    elif isinstance(parsed, CompletionRequest):
        prompts = parsed.prompt if isinstance(parsed.prompt, list) else [parsed.prompt]
        inputs = [{"role": "user", "parts": [text(p if isinstance(p, str) else str(p))]}
                  for p in prompts]
    else:
        return {}
    attrs: dict[str, AttributeValue] = {"gen_ai.input.messages": orjson.dumps(inputs).decode()}
    if body is not None and status == 200:
        outputs = _answers(body, bool(parsed.stream))
        attrs["gen_ai.output.messages"] = orjson.dumps(outputs).decode()
    return attrs


def _answers(body: bytes, stream: bool) -> list[dict[str, Any]]:
    """The choices' texts and finish reasons from a JSON answer or from an SSE stream."""
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    try:
        chunks = ([orjson.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
                  if stream else [orjson.loads(body)])
    except orjson.JSONDecodeError:
        return []
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            message = choice.get("delta") or choice.get("message")  # chat; else a completion
            part = message.get("content") if isinstance(message, dict) else choice.get("text")
            texts.setdefault(index, []).append(part or "")
            if choice.get("finish_reason"):
                reasons[index] = choice["finish_reason"]
    return [{"role": "assistant", "parts": [{"type": "text",
                                             "content": _scrub("".join(parts))}],
             "finish_reason": reasons.get(i)} for i, parts in sorted(texts.items())]


def _scrub(text: str) -> str:
    return redact(text, scan(text))


def upstream_span(replica: Replica, path: str, model: str, reason: str
                  ) -> AbstractContextManager[Span | None]:
    """A CLIENT span for one attempt at calling a replica, from the request until its response
    headers (a retry on another replica is a sibling span), with why routing chose it; a no-op
    while tracing is off."""
    if not tracing.enabled():
        return _OFF
    url = urlsplit(replica.url)
    return tracing.span(f"POST {path}", kind=SpanKind.CLIENT, attributes={
        "http.request.method": "POST", "url.full": replica.url + path,
        "server.address": url.hostname or "", "server.port": url.port or 80,
        "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": model,
        "llmops.device": replica.device, "llmops.routing.reason": reason})
