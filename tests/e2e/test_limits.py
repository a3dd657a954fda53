"""Limits that hold exactly across two gateway processes sharing Redis and PostgreSQL, in
front of the real vLLM engines."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson
import pytest

from llmops.cli.stack import CHAT_MODEL
from tests.e2e.conftest import Engines, Gateway, GatewayFactory, model, pool

# Self-hosted pricing of 3600 USD an hour: a prompt token costs 0.001 USD, a completion token
# 0.01 USD, so budgets are reached in a few requests.
PRICED = {"cost_per_hour_usd": 3600.0, "prefill_tokens_per_s": 1000.0,
          "decode_tokens_per_s": 100.0}
BODY = orjson.dumps({"model": CHAT_MODEL, "max_tokens": 4,
                     "messages": [{"role": "user", "content": "Say hi."}]})


@pytest.fixture(scope="module")
def pair(engines: Engines, gateway_factory: GatewayFactory, postgres_url: str
         ) -> tuple[Gateway, Gateway]:
    shared = {"database_url": postgres_url, "redis_prefix": f"llmops-e2e-{uuid.uuid4().hex[:8]}"}
    models = [model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url, **PRICED),
                    context_length=2048)]
    return gateway_factory(models, **shared), gateway_factory(models, **shared)


def new_key(gateway: Gateway, **limits: Any) -> dict[str, Any]:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers) as admin:
        tenant = admin.post("/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}"}).json()
        key = admin.post("/admin/keys", json={"tenant_id": tenant["id"], **limits})
    assert key.status_code == 201, key.text
    return dict(key.json())


async def burst(pair: tuple[Gateway, Gateway], key: str, n: int) -> list[httpx.Response]:
    """n identical requests at once, alternating between the two gateways."""
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return list(await asyncio.gather(*(
            client.post(f"{pair[i % 2].base_url}/chat/completions", content=BODY,
                        headers=headers) for i in range(n))))


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in responses:
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


async def test_rpm_is_exact_across_two_gateways(pair: tuple[Gateway, Gateway]) -> None:
    key = new_key(pair[0], rpm_limit=10)["key"]
    responses = await burst(pair, key, 50)
    assert statuses(responses) == {200: 10, 429: 40}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    served = next(r for r in responses if r.status_code == 200)
    assert served.headers["x-ratelimit-limit-requests"] == "10"
    assert int(served.headers["x-ratelimit-remaining-requests"]) < 10


async def test_tpm_is_exact_across_two_gateways(pair: tuple[Gateway, Gateway]) -> None:
    # What one request reserves, read from the headers of a request under a roomy limit.
    probe = new_key(pair[0], tpm_limit=100_000)["key"]
    first = (await burst(pair, probe, 1))[0]
    reserved = 100_000 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert reserved == len(BODY) + 4  # prompt bound (body bytes) + max_tokens
    key = new_key(pair[0], tpm_limit=3 * reserved + reserved // 2)["key"]
    assert statuses(await burst(pair, key, 20)) == {200: 3, 429: 17}


async def test_budget_is_never_overshot(pair: tuple[Gateway, Gateway]) -> None:
    reservation = len(BODY) * 0.001 + 4 * 0.01  # worst case of one request, in USD
    budget = 2.5 * reservation
    created = new_key(pair[1], budget_usd=budget, budget_period="day")
    served = sent = 0
    for _ in range(10):  # bursts until the budget refuses everything
        got = statuses(await burst(pair, created["key"], 8))
        served, sent = served + got.get(200, 0), sent + 8
        if got.get(200, 0) == 0:
            break
    assert served >= 2
    refused = (await burst(pair, created["key"], 1))[0]
    sent += 1
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    async with httpx.AsyncClient(base_url=pair[0].url, headers=pair[0].headers) as admin:
        for _ in range(100):  # the ledger (refusals too) catches up in a few writer rounds
            rows = (await admin.get("/admin/usage", params={
                "key_id": created["id"], "group_by": "key_id"})).json()["data"]
            if rows and rows[0]["requests"] == sent and rows[0]["unfinished"] == 0:
                break
            await asyncio.sleep(0.2)
    assert rows[0]["requests"] == sent
    spent = rows[0]["cost_usd"]
    assert spent <= budget  # reservations are upper bounds: no overshoot at all
    assert spent > budget - reservation  # refused only once the next one might not fit
