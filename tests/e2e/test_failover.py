"""Pools and replicas failing: fallback from a dead GPU pool to the CPU pool, a replica killed
while traffic flows, and no backend at all."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from llmops.cli.stack import CHAT_MODEL, free_port
from tests.e2e.conftest import (
    API_KEY,
    Engines,
    GatewayFactory,
    Running,
    model,
    pool,
)

HELLO = [{"role": "user", "content": "Say hello."}]


def client_for(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)


def test_dead_gpu_pool_falls_back_to_cpu(engines: Engines, gateway_factory: GatewayFactory
                                         ) -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    gw = gateway_factory([model(CHAT_MODEL, "chat", pool("gpu", *dead, priority=10),
                                pool("cpu", engines.chat.url))])
    client = client_for(gw.base_url)
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=HELLO, max_tokens=4)
        assert raw.headers["x-llmops-pool"] == "cpu"
        assert raw.parse().choices[0].message.content
    assert httpx.get(f"{gw.url}/readyz").status_code == 200


def test_higher_priority_pool_is_preferred(engines: Engines, gateway_factory: GatewayFactory
                                           ) -> None:
    # Both pools point at the same healthy engine; only priority decides.
    gw = gateway_factory([model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url),
                                pool("gpu", engines.chat.url, priority=10))])
    raw = client_for(gw.base_url).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=HELLO, max_tokens=2)
    assert raw.headers["x-llmops-pool"] == "gpu"


def test_saturated_gpu_pool_overflows_to_cpu(engines: Engines, gateway_factory: GatewayFactory
                                             ) -> None:
    # A GPU pool that takes one request at a time: concurrent requests spill to the CPU pool.
    gw = gateway_factory([model(CHAT_MODEL, "chat",
                                pool("gpu", engines.chat.url, priority=10, max_concurrency=1),
                                pool("cpu", engines.chat.url))])
    client = client_for(gw.base_url)
    served: list[str] = []

    def call() -> None:
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=HELLO, max_tokens=24, extra_body={"ignore_eos": True})
        served.append(raw.headers["x-llmops-pool"])

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(served)) == ["cpu", "gpu"] and len(served) == 4


# The session's second replica (shared with the routing tests, so it runs after them).
@pytest.mark.kills_second_chat
def test_replica_killed_mid_test(engines: Engines, second_chat: Running,
                                 gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([model(CHAT_MODEL, "chat",
                                pool("cpu", engines.chat.url, second_chat.url))])
    client = client_for(gw.base_url)
    results: list[str] = []
    errors: list[Exception] = []
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            try:
                resp = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO,
                                                      max_tokens=8)
                results.append(resp.choices[0].message.content or "")
            except Exception as exc:  # any failure is what this test is about
                errors.append(exc)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    while len(results) < 6:
        time.sleep(0.1)
    second_chat.kill()
    killed_at = len(results)
    while len(results) < killed_at + 12:
        assert not errors, errors
        time.sleep(0.1)
    done.set()
    for w in workers:
        w.join()
    assert not errors, errors
    ready = httpx.get(f"{gw.url}/readyz").json()
    assert ready["models"][CHAT_MODEL] == {"healthy_replicas": 1, "replicas": 2}


def test_all_replicas_down(gateway_factory: GatewayFactory) -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    gw = gateway_factory([model(CHAT_MODEL, "chat", pool("gpu", dead[0], priority=1),
                                pool("cpu", *dead[1:]))])
    ready = httpx.get(f"{gw.url}/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    resp = httpx.post(f"{gw.base_url}/chat/completions", headers={
        "Authorization": f"Bearer {API_KEY}"}, json={"model": CHAT_MODEL, "messages": HELLO})
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_healthy_backend"
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.InternalServerError) as info:
        client_for(gw.base_url).chat.completions.create(model=CHAT_MODEL, messages=HELLO)
    assert info.value.status_code == 503
