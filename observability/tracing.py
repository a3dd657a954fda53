"""OpenTelemetry tracing for the gateway and the workers, off unless the standard `OTEL_*`
variables ask for it.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
set, or `OTEL_TRACES_EXPORTER` names `otlp`; never with `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none`. Spans go through a `BatchSpanProcessor` to an OTLP exporter
(HTTP/protobuf, or gRPC when `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL=grpc`), which read their
endpoint, headers and timeout from the same variables. While tracing is off every helper here
returns at once without creating a span, so the request path pays nothing for it.

Prompts and completions are recorded only with
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

__all__ = [
    "CAPTURE_CONTENT",
    "capture_content",
    "configure_tracing",
    "enabled",
    "extract",
    "failed",
    "inject",
    "otlp_exporter",
    "span",
    "task_headers",
    "task_span",
    "use_provider",
    "wanted",
]

CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

_FLUSH_TIMEOUT_MS = 5_000

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether these variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    exporters.discard("")
    if exporters:
        return "otlp" in exporters  # "none", or only exporters we do not ship
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    """The OTLP span exporter these variables choose (HTTP/protobuf unless gRPC)."""
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    # Imported only when used: grpc is a heavy import that the HTTP exporter does not need.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )
        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )
        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use "
                     "'http/protobuf' or 'grpc'")


def configure_tracing(service_name: str) -> bool:
    """Start exporting traces if the environment asks for it (once per process); whether
    tracing is on. `OTEL_SERVICE_NAME` overrides `service_name`."""
    if _tracer is None and wanted(os.environ):
        resource = Resource.create(
            {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
        provider = TracerProvider(resource=resource)  # samples as OTEL_TRACES_SAMPLER says
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter(os.environ)))
        trace.set_tracer_provider(provider)
        use_provider(provider)
    return _tracer is not None


def use_provider(provider: TracerProvider | None) -> None:
    """Trace with `provider` from now on (tests use one with an in-memory exporter); None
    turns tracing off."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer("llmops") if provider is not None else None


def enabled() -> bool:
    return _tracer is not None


def capture_content() -> bool:
    """Whether prompts and completions may be recorded (opt-in: they are the users' data)."""
    return os.environ.get(CAPTURE_CONTENT, "").strip().lower() == "true"


@contextlib.contextmanager
def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL,
         attributes: Mapping[str, AttributeValue] | None = None,
         context: Context | None = None, links: list[Link] | None = None
         ) -> Iterator[Span | None]:
    """A span made current for the block, or None while tracing is off. An exception leaving
    the block is recorded and marks the span as failed."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, context=context, kind=kind,
                                       attributes=attributes, links=links) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_attribute("error.type", type(exc).__qualname__)
            raise


def failed(span: Span | None, error_type: str) -> None:
    """Mark a span as failed with an `error.type` (for failures handled inside its block)."""
    if span is not None:
        span.set_attribute("error.type", error_type)
        span.set_status(StatusCode.ERROR)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (W3C `traceparent`) to outgoing headers."""
    if _tracer is not None:
        propagate.inject(headers)
    return headers


def extract(headers: Iterable[tuple[bytes, bytes]]) -> Context:
    """The trace context an incoming request carries, from its raw (ASGI) headers."""
    fields = {f.encode() for f in propagate.get_global_textmap().fields}
    return propagate.extract({k.decode("latin-1"): v.decode("latin-1")
                              for k, v in headers if k in fields})


def task_headers() -> dict[str, str]:
    """Headers for a Celery message that carry the current trace context, so that the task's
    span links back to the request that enqueued it; none while tracing is off."""
    return inject({})


@contextlib.contextmanager
def task_span(task: str, request: Any, attributes: Mapping[str, AttributeValue] | None = None
              ) -> Iterator[Span | None]:
    """A CONSUMER span for one Celery task run (`request` is the task's `self.request`),
    linked to the span that enqueued it. A link, not a parent: a training run can outlast
    the request's trace by hours, and a redelivered task is a new run of its own."""
    if _tracer is None:
        yield None
        return
    # A message's custom headers become attributes of Celery's request context (a task
    # applied eagerly has them under `headers`).
    nested = getattr(request, "headers", None)
    nested = nested if isinstance(nested, dict) else {}
    carrier = {f: v for f in propagate.get_global_textmap().fields
               if isinstance(v := getattr(request, f, None) or nested.get(f), str)}
    origin = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    attrs: dict[str, AttributeValue] = {
        "messaging.system": "celery", "messaging.operation.name": "process",
        "messaging.operation.type": "process", "messaging.destination.name": task}
    if isinstance(task_id := getattr(request, "id", None), str):
        attrs["messaging.message.id"] = task_id
    try:
        with span(f"process {task}", kind=SpanKind.CONSUMER, context=Context(),
                  attributes={**attrs, **(attributes or {})},
                  links=[Link(origin)] if origin.is_valid else None) as current:
            yield current
    finally:
        # A worker process may be killed between tasks: send this task's spans now.
        if _provider is not None:
            _provider.force_flush(_FLUSH_TIMEOUT_MS)
