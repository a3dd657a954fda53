"""Traces of real traffic: a gateway pointed at an OTLP/HTTP receiver by the standard OTEL_*
variables exports a SERVER span per request with GenAI attributes and real token counts, and a
CLIENT span for its call to the vLLM engine in the same trace; a client's `traceparent` is
continued, and a stream's span carries the stream's usage."""

from __future__ import annotations

import time

import httpx
from openai import OpenAI

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL
from tests.e2e.conftest import API_KEY, Engines, GatewayFactory, standard_models
from tests.observability.otlp import OtlpReceiver, ReceivedSpan

COUNT = [{"role": "user", "content": "Count from one to twenty."}]
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def servers(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.kind == "SERVER"]


def child(spans: list[ReceivedSpan], parent: ReceivedSpan) -> ReceivedSpan:
    [span] = [s for s in spans if s.parent_span_id == parent.span_id]
    return span


def test_requests_are_traced_over_otlp(engines: Engines, gateway_factory: GatewayFactory
                                       ) -> None:
    with OtlpReceiver() as receiver:
        gw = gateway_factory(standard_models(engines), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"})
        deadline = time.monotonic() + 30
        while httpx.get(f"{gw.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.2)
        with OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120) as client:
            answer = client.chat.completions.create(
                model=CHAT_MODEL, messages=COUNT, max_tokens=4, temperature=0.0,
                extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
            with client.chat.completions.create(model=CHAT_MODEL, messages=COUNT, max_tokens=6,
                                                stream=True, stream_options={"include_usage": True}
                                                ) as stream:
                [usage] = [c.usage for c in stream if c.usage]
            client.embeddings.create(model=EMBEDDING_MODEL, input=["traces are exported"])
        spans = receiver.wait_for(lambda s: len(servers(s)) == 3 and len(s) == 6)
        gw.running.stop()  # while the receiver listens: the gateway flushes on its way out
    assert answer.usage is not None

    assert {s.service for s in spans} == {"llmops-gateway"}
    [chat] = [s for s in servers(spans) if s.trace_id == CLIENT_TRACE]
    [streamed] = [s for s in servers(spans) if s is not chat and s.name.startswith("chat")]
    [embedding] = [s for s in servers(spans) if s.name.startswith("embeddings")]
    # The client's trace is continued; the engine call is the request span's child.
    assert (chat.trace_id, chat.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert chat.name == f"chat {CHAT_MODEL}"
    attributes = chat.attributes
    assert {k: attributes[k] for k in (
        "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
        "gen_ai.response.model", "gen_ai.request.max_tokens", "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens", "http.route", "http.response.status_code",
        "llmops.device")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": CHAT_MODEL, "gen_ai.response.model": CHAT_MODEL,
        "gen_ai.request.max_tokens": 4,
        "gen_ai.usage.input_tokens": answer.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": answer.usage.completion_tokens,
        "http.route": "/v1/chat/completions", "http.response.status_code": 200,
        "llmops.device": "cpu"}
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert attributes["gen_ai.response.finish_reasons"] == [answer.choices[0].finish_reason]
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output")) for k in attributes)
    call = child(spans, chat)
    assert (call.kind, call.trace_id, call.name) == ("CLIENT", CLIENT_TRACE,
                                                     "POST /v1/chat/completions")
    assert call.attributes["http.response.status_code"] == 200

    # A stream's span ends with the stream, holding the tokens it produced.
    assert streamed.name == f"chat {CHAT_MODEL}" and streamed.parent_span_id == ""
    assert streamed.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
    assert streamed.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
    assert child(spans, streamed).trace_id == streamed.trace_id

    assert embedding.name == f"embeddings {EMBEDDING_MODEL}"
    assert embedding.attributes["gen_ai.usage.input_tokens"] > 0
    assert child(spans, embedding).kind == "CLIENT"
