"""The gateway's Prometheus metrics under real traffic to real vLLM engines: requests by model,
pool, device, status and tenant, latency histograms, time to first token of a stream, tokens,
backend health and Celery's queues; and metrics on a port of their own behind a token, with a
fallback to the CPU pool counted."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL, free_port
from tenancy.tenants import ADMIN_TENANT
from tests.e2e.conftest import API_KEY, Engines, Gateway, GatewayFactory, model, pool

COUNT = [{"role": "user", "content": "Count from one to twenty."}]
Families = dict[str, list[Sample]]


def wait_ready(gw: Gateway) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{gw.url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "gateway never became ready"
        time.sleep(0.2)


def scrape_until(url: str, done: Callable[[Families], bool], headers: dict[str, str] | None = None
                 ) -> Families:
    """Scrape until `done` holds: a stream's request ends just after its last byte, and
    figures from the store and Redis come from a background task."""
    deadline = time.monotonic() + 20
    while True:
        resp = httpx.get(url, headers=headers)
        assert resp.status_code == 200, resp.text
        families = {f.name: f.samples for f in text_string_to_metric_families(resp.text)}
        if done(families) or time.monotonic() > deadline:
            return families
        time.sleep(0.25)


def total(families: Families, family: str, sample: str, **labels: str) -> float:
    return sum(s.value for s in families.get(family, [])
               if s.name == sample and labels.items() <= s.labels.items())


def test_metrics_count_real_traffic(engines: Engines, gateway_factory: GatewayFactory) -> None:
    chat, embedding = engines.chat.url, engines.embedding.url
    gw = gateway_factory([model(CHAT_MODEL, "chat", pool("cpu", chat), context_length=2048),
                          model(EMBEDDING_MODEL, "embedding", pool("cpu", embedding),
                                context_length=256)],
                         metrics={"tenants": [ADMIN_TENANT]})
    wait_ready(gw)
    completion_tokens = 0
    with OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120) as client:
        for _ in range(2):
            answer = client.chat.completions.create(model=CHAT_MODEL, messages=COUNT,
                                                    max_tokens=4)
            assert answer.usage is not None
            completion_tokens += answer.usage.completion_tokens
        with client.chat.completions.create(model=CHAT_MODEL, messages=COUNT, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}
                                            ) as stream:
            [streamed] = [c.usage.completion_tokens for c in stream if c.usage]
        assert streamed > 1  # so that it has a time per output token
        completion_tokens += streamed
        client.embeddings.create(model=EMBEDDING_MODEL, input=["metrics are counted"])
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=COUNT)

    m = scrape_until(f"{gw.url}/metrics", lambda f: total(
        f, "llmops_requests", "llmops_requests_total") == 5 and "llmops_queue_length" in f)
    requests = {"tenant": ADMIN_TENANT, "pool": "primary", "device": "cpu",
                "status_class": "2xx"}
    assert total(m, "llmops_requests", "llmops_requests_total", model=CHAT_MODEL,
                 endpoint="/v1/chat/completions", **requests) == 3
    assert total(m, "llmops_requests", "llmops_requests_total", model=EMBEDDING_MODEL,
                 endpoint="/v1/embeddings", **requests) == 1
    assert total(m, "llmops_requests", "llmops_requests_total", model="unknown", pool="none",
                 device="none", status_class="4xx", tenant=ADMIN_TENANT) == 1
    assert not any(s.labels["model"] == "no-such-model" for s in m["llmops_requests"])

    def count(family: str, name: str) -> float:
        return total(m, family, f"{family}_count", model=name, device="cpu")

    assert count("llmops_request_duration_seconds", CHAT_MODEL) == 3
    assert count("llmops_request_duration_seconds", EMBEDDING_MODEL) == 1
    assert count("llmops_time_to_first_token_seconds", CHAT_MODEL) == 1  # the stream only
    assert count("llmops_time_per_output_token_seconds", CHAT_MODEL) == 1
    assert total(m, "llmops_time_to_first_token_seconds", "llmops_time_to_first_token_seconds_sum",
                 model=CHAT_MODEL) > 0
    assert total(m, "llmops_tokens", "llmops_tokens_total", model=CHAT_MODEL,
                 kind="completion") == completion_tokens
    assert total(m, "llmops_tokens", "llmops_tokens_total", model=CHAT_MODEL, kind="prompt") > 0
    assert total(m, "llmops_tokens", "llmops_tokens_total", model=EMBEDDING_MODEL,
                 kind="prompt") > 0
    assert total(m, "llmops_requests_in_flight", "llmops_requests_in_flight") == 0

    for name, url in ((CHAT_MODEL, chat), (EMBEDDING_MODEL, embedding)):
        assert total(m, "llmops_backend_healthy", "llmops_backend_healthy", model=name,
                     pool="primary", replica=url) == 1
        assert total(m, "llmops_circuit_state", "llmops_circuit_state", model=name,
                     replica=url, state="closed") == 1
    assert total(m, "llmops_queue_length", "llmops_queue_length", queue="finetune") == 0
    assert total(m, "llmops_queue_length", "llmops_queue_length", queue="ingest") == 0
    assert total(m, "llmops_finetune_jobs", "llmops_finetune_jobs", status="running") == 0


def test_metrics_on_their_own_port_behind_a_token_count_a_fallback(
        engines: Engines, gateway_factory: GatewayFactory) -> None:
    dead, port, token = f"http://127.0.0.1:{free_port()}", free_port(), "scrape-secret"
    gw = gateway_factory([model(CHAT_MODEL, "chat", pool("gpu", dead, priority=10),
                                pool("cpu", engines.chat.url))],
                         metrics={"port": port, "token": token})
    wait_ready(gw)
    resp = httpx.post(f"{gw.base_url}/chat/completions", headers=gw.headers, timeout=120,
                      json={"model": CHAT_MODEL, "messages": COUNT, "max_tokens": 2})
    assert resp.status_code == 200 and resp.headers["x-llmops-pool"] == "cpu"

    assert httpx.get(f"{gw.url}/metrics").status_code == 404  # not on the API's port
    url = f"http://127.0.0.1:{port}/metrics"
    refused = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    m = scrape_until(url, lambda f: total(f, "llmops_requests", "llmops_requests_total") == 1,
                     headers={"Authorization": f"Bearer {token}"})
    assert total(m, "llmops_requests", "llmops_requests_total", model=CHAT_MODEL,
                 pool="fallback1", device="cpu", status_class="2xx") == 1
    assert total(m, "llmops_fallbacks", "llmops_fallbacks_total", model=CHAT_MODEL,
                 from_device="gpu", to_device="cpu") == 1
    assert total(m, "llmops_backend_healthy", "llmops_backend_healthy", pool="primary",
                 replica=dead) == 0
    assert total(m, "llmops_backend_healthy", "llmops_backend_healthy", pool="fallback1",
                 replica=engines.chat.url) == 1
