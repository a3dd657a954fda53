"""Tracing: off unless the OTEL_* variables ask for it; when on, a SERVER span per API request
that continues the client's trace and carries GenAI attributes, a CLIENT span per upstream call
whose context reaches the engine, no prompt or answer text unless opted in, and Celery tasks
linked to the request that enqueued them.

The gateway runs in process against a tiny inline upstream standing in for vLLM at the HTTP
boundary (so that the headers it receives can be inspected); spans go to the SDK's in-memory
exporter, or, for the set-up itself, to a real OTLP/HTTP receiver."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from celery import Celery
from celery.contrib.testing.worker import start_worker
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.inference.spans import TracingMiddleware
from llmops.settings import Settings
from observability import tracing
from retrieval import Hit
from retrieval.grounding import Caller, Retriever
from tenancy.tenants import ADMIN_TENANT, Limits, Principal
from tests.observability.otlp import OtlpReceiver
from tests.standin import serve_engine

KEY = "sk-admin-unit-tracing"
PROMPT = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                  "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME",
                  tracing.CAPTURE_CONTENT)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    tracing.use_provider(None)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use_provider(provider)
    return memory


def _chunk(choices: list[dict[str, Any]], usage: dict[str, int]) -> bytes:
    return b"data: " + json.dumps({"object": "chat.completion.chunk", "model": "engine",
                                   "choices": choices, "usage": usage}).encode() + b"\n\n"


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in for vLLM's chat endpoint: JSON or SSE answers, and a 500 for one model."""
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({"headers": {k.lower(): v for k, v in request.headers.items()},
                     "body": body})
        if body["model"] == "broken-engine":
            return web.json_response({"error": {"message": "engine failed"}}, status=500)
        if not body.get("stream"):
            return web.json_response({
                "id": "x", "object": "chat.completion", "model": "engine",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": ANSWER}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 6}})
        stream = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await stream.prepare(request)
        words = ANSWER.split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            await stream.write(_chunk(
                [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                  "finish_reason": "length" if last else None}],
                {"prompt_tokens": 7, "completion_tokens": i + 1}))
        await stream.write(_chunk([], {"prompt_tokens": 7, "completion_tokens": len(words)}))
        await stream.write(b"data: [DONE]\n\n")
        return stream

    async with serve_engine(chat) as url:
        yield url, seen


@pytest.fixture
async def gateway(upstream: tuple[str, list[dict[str, Any]]], tmp_path: Path
                  ) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway in process, with tracing on or off as set before this fixture runs."""
    url, _ = upstream
    prefix = f"llmops-test-{uuid.uuid4().hex[:8]}"
    pool = [{"device": "gpu", "urls": [url]}]
    settings = Settings(
        admin_key=KEY, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", redis_prefix=prefix,
        ledger={"spool_path": tmp_path / "spool"}, files={"root": tmp_path / "files"},
        models=[{"name": "m", "kind": "chat", "served_name": "engine", "pools": pool},
                {"name": "broken", "kind": "chat", "served_name": "broken-engine",
                 "pools": pool}],
        drift={"enabled": False})  # not under test, and its sampling would add requests
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw",
            headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client
    redis = Redis.from_url(settings.redis_url)
    await redis.delete(*[k async for k in redis.scan_iter(f"{prefix}:*")] or ["-"])
    await redis.aclose()


def chat(stream: bool = False, model: str = "m") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 16, "temperature": 0.2, "top_p": 0.9, "stream": stream}


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == kind]


def test_public_surface() -> None:
    assert set(tracing.__all__) == {
        "CAPTURE_CONTENT", "capture_content", "configure_tracing", "enabled", "extract",
        "failed", "inject", "otlp_exporter", "span", "task_headers", "task_span",
        "use_provider", "wanted"}


@pytest.mark.parametrize(("variables", "wanted"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ({"OTEL_SERVICE_NAME": "gw", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"}, False),
])
def test_tracing_is_on_only_when_the_variables_ask_for_it(variables: dict[str, str],
                                                           wanted: bool) -> None:
    assert tracing.wanted(variables) is wanted


async def test_off_by_default_the_gateway_neither_traces_nor_propagates(
        upstream: tuple[str, list[dict[str, Any]]], gateway: httpx.AsyncClient) -> None:
    assert not tracing.configure_tracing("llmops-gateway")
    app = create_app(Settings(admin_key=KEY, models=[
        {"name": "m", "kind": "chat", "pools": [{"device": "cpu", "urls": ["http://x:1"]}]}]))
    assert TracingMiddleware not in [m.cls for m in app.user_middleware]
    resp = await gateway.post("/v1/chat/completions", json=chat(),
                              headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert resp.status_code == 200
    [request] = upstream[1]
    assert "traceparent" not in request["headers"]


@pytest.mark.parametrize("service_name", [None, "gateway-eu-1"])
def test_spans_are_exported_over_otlp_http(monkeypatch: pytest.MonkeyPatch,
                                           service_name: str | None) -> None:
    installed: list[TracerProvider] = []
    # The process's global provider can be set only once: this test keeps its own.
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        if service_name is not None:
            monkeypatch.setenv("OTEL_SERVICE_NAME", service_name)
        assert tracing.configure_tracing("llmops-worker")
        [provider] = installed
        try:
            with tracing.span("unit of work", attributes={"x": 1}):
                pass
            assert provider.force_flush(5_000)
        finally:
            provider.shutdown()
    [span] = receiver.spans
    assert (span.service, span.name, span.attributes) == (
        service_name or "llmops-worker", "unit of work", {"x": 1})


def test_the_protocol_variable_chooses_the_exporter() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    assert isinstance(tracing.otlp_exporter({}), Http)
    grpc = tracing.otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                  "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})
    assert isinstance(grpc, Grpc)
    grpc.shutdown()
    with pytest.raises(ValueError, match="http/json"):
        tracing.otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


async def test_a_chat_request_is_a_server_span_continuing_the_clients_trace(
        exporter: InMemorySpanExporter, upstream: tuple[str, list[dict[str, Any]]],
        gateway: httpx.AsyncClient) -> None:
    resp = await gateway.post("/v1/chat/completions", json=chat(), headers={
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-request-id": "rid-7"})
    assert resp.status_code == 200
    spans = exporter.get_finished_spans()
    [server], [client] = by_kind(spans, SpanKind.SERVER), by_kind(spans, SpanKind.CLIENT)
    assert server.name == "chat m"
    assert f"{server.context.trace_id:032x}" == CLIENT_TRACE
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CLIENT_SPAN
    assert dict(server.attributes or {}) == {
        "http.request.method": "POST", "url.path": "/v1/chat/completions", "url.scheme": "http",
        "http.route": "/v1/chat/completions", "http.response.status_code": 200,
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "m", "gen_ai.response.model": "m",
        "gen_ai.request.max_tokens": 16, "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9, "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 6, "gen_ai.response.finish_reasons": ("stop",),
        "llmops.tenant.id": ADMIN_TENANT, "llmops.request.id": "rid-7",
        "llmops.device": "gpu", "llmops.pool.priority": 0}
    # The upstream call is the server span's child, and vLLM receives its context.
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.name == "POST /v1/chat/completions"
    assert client.attributes is not None and client.attributes["gen_ai.request.model"] == "engine"
    [request] = upstream[1]
    assert request["headers"]["traceparent"] == \
        f"00-{CLIENT_TRACE}-{client.context.span_id:016x}-01"
    # Without the opt-in, no prompt or answer text is recorded anywhere.
    recorded = json.dumps([dict(s.attributes or {}) for s in spans], default=str)
    assert PROMPT not in recorded and "Paris" not in recorded
    assert "gen_ai.input.messages" not in recorded and "gen_ai.output.messages" not in recorded


async def test_a_streamed_span_ends_with_the_stream_and_holds_its_usage(
        exporter: InMemorySpanExporter, gateway: httpx.AsyncClient) -> None:
    resp = await gateway.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status_code == 200 and "data: [DONE]" in resp.text
    [server] = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    attributes = server.attributes or {}
    assert attributes["gen_ai.usage.output_tokens"] == len(ANSWER.split(" "))
    assert attributes["gen_ai.usage.input_tokens"] == 7
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert server.parent is None  # no traceparent: a trace of its own


async def test_a_failing_engine_marks_both_spans_failed(
        exporter: InMemorySpanExporter, gateway: httpx.AsyncClient) -> None:
    resp = await gateway.post("/v1/chat/completions", json=chat(model="broken"))
    assert resp.status_code == 502
    spans = exporter.get_finished_spans()
    [server], [client] = by_kind(spans, SpanKind.SERVER), by_kind(spans, SpanKind.CLIENT)
    assert server.status.status_code == client.status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "502"
    assert (client.attributes or {})["error.type"] == "500"


async def test_other_routes_are_named_by_method_and_route(
        exporter: InMemorySpanExporter, gateway: httpx.AsyncClient) -> None:
    assert (await gateway.get("/v1/models")).status_code == 200
    assert (await gateway.get("/healthz")).status_code == 200  # not an API request: no span
    [server] = exporter.get_finished_spans()
    assert server.name == "GET /v1/models" and server.kind == SpanKind.SERVER
    assert "gen_ai.operation.name" not in (server.attributes or {})


async def test_prompts_and_answers_are_recorded_only_when_opted_in(
        exporter: InMemorySpanExporter, gateway: httpx.AsyncClient,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracing.CAPTURE_CONTENT, "true")
    for stream in (False, True):
        assert (await gateway.post("/v1/chat/completions", json=chat(stream))).status_code == 200
    for server in by_kind(exporter.get_finished_spans(), SpanKind.SERVER):
        attributes = server.attributes or {}
        assert json.loads(str(attributes["gen_ai.input.messages"])) == [
            {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]
        [answer] = json.loads(str(attributes["gen_ai.output.messages"]))
        assert answer["parts"] == [{"type": "text", "content": ANSWER}]


def test_a_celery_task_span_links_to_the_request_that_enqueued_it(
        exporter: InMemorySpanExporter) -> None:
    app = Celery("tracing-test", broker="memory://")  # a real worker, on an in-process broker
    app.conf.broker_transport_options = {"polling_interval": 0.05}

    @app.task(name="tests.traced", bind=True)  # type: ignore[untyped-decorator]
    def traced(self: Any, job_id: str) -> str:
        with tracing.task_span("tests.traced", self.request, {"llmops.job.id": job_id}):
            return job_id

    with start_worker(app, perform_ping_check=False, shutdown_timeout=10):
        with tracing.span("POST /v1/fine_tuning/jobs", kind=SpanKind.SERVER) as request:
            assert request is not None
            app.send_task("tests.traced", args=["ftjob-1"], headers=tracing.task_headers())
        deadline = time.monotonic() + 10
        while not by_kind(exporter.get_finished_spans(), SpanKind.CONSUMER):
            assert time.monotonic() < deadline, "the task never ran"
            time.sleep(0.05)
    [task] = by_kind(exporter.get_finished_spans(), SpanKind.CONSUMER)
    assert task.name == "process tests.traced"
    assert task.parent is None  # a trace of its own ...
    [link] = task.links  # ... linked to the request's span
    assert link.context.span_id == request.get_span_context().span_id
    assert link.context.trace_id == request.get_span_context().trace_id
    assert (task.attributes or {})["llmops.job.id"] == "ftjob-1"


WHO = Principal("key_a", "ten_a", "member", None, Limits(), Limits())


class _Stores:
    async def get(self, tenant_id: str, store_id: str) -> object:
        return object()


class _Index:
    def search(self, *args: Any, **options: Any) -> list[Hit]:
        return [Hit("p1", 0.8, {"file": "file-1", "chunk": 0, "start": 0, "end": 5,
                                "text": "Paris"})]


async def test_a_search_is_a_span_of_the_request(exporter: InMemorySpanExporter) -> None:
    async def embed(caller: Caller, texts: list[str]) -> list[list[float]]:
        return [[0.0, 1.0] for _ in texts]

    retriever = Retriever(_Stores(), embed, 0.0)  # type: ignore[arg-type]
    retriever.index = _Index()  # type: ignore[assignment]
    with tracing.span("chat m", kind=SpanKind.SERVER):
        sources = await retriever.search(Caller(WHO, "req-1"), ["vs_1", "vs_2"], [PROMPT],
                                         limit=3, filters=None, threshold=0.1, mode="dense")
    assert [s.text for s in sources] == ["Paris"]
    search, request = exporter.get_finished_spans()
    assert search.parent is not None and search.parent.span_id == request.context.span_id
    assert (search.name, dict(search.attributes or {})) == ("vector_stores.search", {
        "llmops.retrieval.stores": 2, "llmops.retrieval.queries": 1,
        "llmops.retrieval.mode": "dense", "llmops.retrieval.ranker": "auto",
        "llmops.retrieval.limit": 3,
        "llmops.retrieval.filtered": False, "llmops.retrieval.results": 1})
