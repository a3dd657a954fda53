"""Flow control on the real stack: a model whose one vLLM-CPU replica takes one request at a
time. Tenant A floods it; tenant B, three times A's weight, is served ahead of A's backlog; A's
requests past its queue's bound are refused with 429 and Retry-After; A's batch-class request
goes last (and the engine, run with priority scheduling, accepts its priority); the ledger has
exactly one record per request, refused ones included."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from llmops.cli.stack import CHAT_MODEL
from tests.e2e.conftest import Engines, Gateway, GatewayFactory, model, pool
from tests.e2e.test_ledger import records

MAX_QUEUED = 11
HELLO = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def gateway(engines: Engines, gateway_factory: GatewayFactory) -> Gateway:
    # One request at a time on the session's engine (started with priority scheduling).
    chat = model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url, max_concurrency=1,
                                          priority_scheduling=True), context_length=2048)
    return gateway_factory([chat], flow={"max_queued": MAX_QUEUED, "max_wait_s": 300,
                                         "retry_after_s": 3})


def tenant_key(gateway: Gateway, weight: int) -> str:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=30) as admin:
        tenant = admin.post("/admin/tenants", json={"name": f"flow-{uuid.uuid4().hex[:8]}",
                                                    "weight": weight})
        assert tenant.status_code == 201 and tenant.json()["weight"] == weight, tenant.text
        key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"]})
    assert key.status_code == 201, key.text
    return str(key.json()["key"])


def queued(gateway: Gateway) -> float:
    """Requests the gateway holds for the model now (its metrics, every class)."""
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    series = rf'^llmops_flow_queue_depth{{model="{re.escape(CHAT_MODEL)}",priority="\w+"}} (\S+)$'
    return sum(float(m[1]) for m in re.finditer(series, text, re.M))


async def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"{what}: not in {timeout_s} s"
        await asyncio.sleep(0.1)


async def test_a_quiet_tenant_is_served_ahead_of_a_flood_by_weight(gateway: Gateway) -> None:
    a = AsyncOpenAI(api_key=tenant_key(gateway, 1), base_url=gateway.base_url, max_retries=0,
                    timeout=300)
    b = AsyncOpenAI(api_key=tenant_key(gateway, 3), base_url=gateway.base_url, max_retries=0,
                    timeout=300)
    sent: dict[str, str] = {}  # request id -> who sent it
    served: list[str] = []

    def rid(who: str) -> dict[str, str]:
        request_id = f"flow-{who}-{uuid.uuid4().hex[:8]}"
        sent[request_id] = who
        return {"x-request-id": request_id}

    async def ask(client: AsyncOpenAI, who: str, headers: dict[str, str] | None = None
                  ) -> None:
        answer = await client.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, max_tokens=8, temperature=0,
            extra_headers={**rid(who), **(headers or {})})
        assert answer.choices[0].message.content is not None
        served.append(who)

    try:
        # A long answer holds the replica while the queues fill up.
        blocker = await a.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, max_tokens=1500, stream=True,
            extra_body={"ignore_eos": True}, extra_headers=rid("blocker"))
        await anext(aiter(blocker))
        flood = [asyncio.create_task(ask(a, "a")) for _ in range(MAX_QUEUED - 1)]
        flood.append(asyncio.create_task(ask(a, "a-batch", {"x-llmops-priority": "batch"})))
        await wait_until(lambda: queued(gateway) == MAX_QUEUED, 60, "A's queue full")

        for _ in range(2):  # past the bound of A's queue
            with pytest.raises(openai.RateLimitError) as refused:
                await a.chat.completions.create(model=CHAT_MODEL, messages=HELLO,
                                                max_tokens=8, extra_headers=rid("a-refused"))
            assert refused.value.status_code == 429
            assert refused.value.response.headers["retry-after"] == "3"
            assert refused.value.code == "rate_limit_exceeded"

        quiet = [asyncio.create_task(ask(b, "b")) for _ in range(4)]
        await wait_until(lambda: queued(gateway) == MAX_QUEUED + 4, 60, "B's requests queued")
        await blocker.close()  # the client leaves: the replica's room goes to the queues
        await asyncio.gather(*flood, *quiet)
    finally:
        await a.close()
        await b.close()

    # One request at a time: the order they ended is the order they were let through. B has
    # three turns for each of A's, so its four requests end among the first six, ahead of
    # A's backlog; A's batch request waits behind all of A's interactive ones.
    assert served.count("b") == 4 and served.count("a") == MAX_QUEUED - 1
    assert served[:6].count("b") == 4, served
    assert served[-1] == "a-batch", served
    assert queued(gateway) == 0

    rows = records(gateway, finished=len(sent), total=len(sent), timeout_s=60)
    mine = {r: rows[r].status for r in sent if r in rows}
    assert len(mine) == len(sent)  # one record each: shed and disconnected ones too
    statuses = sorted((sent[r], s) for r, s in mine.items())
    assert statuses == sorted([("blocker", 499), ("a-refused", 429), ("a-refused", 429),
                               ("a-batch", 200)] + [("a", 200)] * (MAX_QUEUED - 1)
                              + [("b", 200)] * 4)
