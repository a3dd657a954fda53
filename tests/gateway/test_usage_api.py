"""Usage, budgets, keys' last use and the engines' state, as the console reads them through the
API: `/v1/usage` forces a member's own tenant and reads its parameters exactly as `/admin/usage`
does, `/v1/usage/budgets` shows what each budget has spent this period, `/admin/keys` says when
each key was last used, and `/admin/engines` is for admins only. The API in process, on SQLite
and a real Redis, with ledger records written straight to the store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from llmops.settings import Settings
from llmops.store import Database
from tenancy.ledger import UsageEvent, record_usage
from tests.databases import REDIS_URL, in_process_gateway

ADMIN = "sk-unit-usage"
DEAD = "http://127.0.0.1:9"  # no engine is called


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Database]]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings = Settings(admin_key=ADMIN, database_url=url, redis_url=REDIS_URL,
                        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        retrieval={"path": tmp_path / "qdrant"},
                        models=[{"name": "chat", "kind": "chat",
                                 "pools": [{"device": "cpu", "urls": [DEAD, DEAD + "0"]}]}])
    db = Database(url)
    async with in_process_gateway(settings, ADMIN) as client:
        yield client, db
    await db.close()


async def _record(db: Database, tenant: str, key: str, status: int = 200, cost: float = 0.5,
                  prompt: int = 10, completion: int = 5, at: datetime | None = None) -> None:
    await record_usage(db, UsageEvent(
        request_id=uuid.uuid4().hex, tenant_id=tenant, key_id=key,
        endpoint="/v1/chat/completions", model="chat", status=status, prompt_tokens=prompt,
        completion_tokens=completion, cost_usd=cost,
        created_at=(at or datetime.now(UTC)).timestamp()))


async def _tenant_with_key(client: httpx.AsyncClient, name: str, **key: object
                           ) -> tuple[str, str, str]:
    tenant = (await client.post("/admin/tenants", json={"name": name, "budget_usd": 10,
                                                        "budget_period": "day"})).json()
    created = (await client.post("/admin/keys", json={"tenant_id": tenant["id"], **key})).json()
    return tenant["id"], created["id"], created["key"]


async def test_a_member_sees_its_own_tenants_usage_read_as_admin_usage_reads_it(
        setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    mine, my_key, plain = await _tenant_with_key(client, "mine")
    other, other_key, _ = await _tenant_with_key(client, "other")
    for status in (200, 200, 429, 500):
        await _record(db, mine, my_key, status=status)
    await _record(db, other, other_key, cost=3.0)
    await _record(db, mine, my_key, at=datetime.now(UTC) - timedelta(days=40))  # long ago
    member = {"authorization": f"Bearer {plain}"}
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()

    # Asking for another tenant's usage still gets one's own.
    got = await client.get("/v1/usage", params={"group_by": "tenant_id,model",
                                                "tenant_id": other, "start": since},
                           headers=member)
    assert got.status_code == 200, got.text
    [row] = got.json()["data"]
    assert (row["tenant_id"], row["model"], row["requests"], row["rejected"], row["errors"],
            row["prompt_tokens"], row["cost_usd"]) == (mine, "chat", 4, 1, 1, 40, 2.0)
    # An admin reads the same numbers from both endpoints, for every tenant.
    params = {"group_by": "tenant_id", "start": since, "period": "day"}
    admin = (await client.get("/admin/usage", params=params)).json()["data"]
    assert (await client.get("/v1/usage", params=params)).json()["data"] == admin
    assert {r["tenant_id"]: r["requests"] for r in admin} == {mine: 4, other: 1}
    everything = (await client.get("/v1/usage", params={"group_by": "key_id"},
                                   headers=member)).json()["data"]
    assert [(r["key_id"], r["requests"]) for r in everything] == [(my_key, 5)]

    # One parser: bad parameters are refused the same way on both, in OpenAI's shape.
    for path in ("/v1/usage", "/admin/usage"):
        bad = await client.get(path, params={"group_by": "tenant_id,secret"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
        bad = await client.get(path, params={"start": since, "end": since})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "end"
    assert (await client.get("/v1/usage", headers={"authorization": "Bearer nope"})
            ).status_code == 401


async def test_budgets_show_this_periods_spend_and_members_see_only_theirs(
        setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    mine, my_key, plain = await _tenant_with_key(client, "mine", budget_usd=2,
                                                 budget_period="month")
    _, sibling, _ = await _tenant_with_key(client, "spare")  # its key has no budget
    sibling_tenant = (await client.get(f"/admin/keys/{sibling}")).json()["tenant_id"]
    await client.post("/admin/keys", json={"tenant_id": mine, "budget_usd": 5})  # a colleague
    await _record(db, mine, my_key, cost=0.25)
    await _record(db, mine, my_key, cost=0.5, at=datetime.now(UTC) - timedelta(days=40))

    everyone = (await client.get("/v1/usage/budgets")).json()["data"]
    # Tenants by name, then keys by age; keys without a budget are left out.
    assert [(b["scope"], b["tenant_id"]) for b in everyone] == [
        ("tenant", mine), ("tenant", sibling_tenant), ("key", mine), ("key", mine)]
    ours = (await client.get("/v1/usage/budgets",
                             headers={"authorization": f"Bearer {plain}"})).json()["data"]
    assert [(b["scope"], b["id"], b["period"], b["budget_usd"], b["spent_usd"]) for b in ours
            ] == [("tenant", mine, "day", 10.0, 0.25), ("key", my_key, "month", 2.0, 0.25)]
    assert ours[0]["period_start"] == int(datetime.now(UTC).replace(
        hour=0, minute=0, second=0, microsecond=0).timestamp())


async def test_keys_say_when_they_were_last_used(
        setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    tenant, used, _ = await _tenant_with_key(client, "t")
    unused = (await client.post("/admin/keys", json={"tenant_id": tenant})).json()
    assert unused["last_used_at"] is None
    earlier = datetime.now(UTC) - timedelta(hours=2)
    await _record(db, tenant, used, at=earlier - timedelta(hours=1))
    await _record(db, tenant, used, at=earlier)
    listed = (await client.get("/admin/keys", params={"tenant_id": tenant})).json()["data"]
    assert {k["id"]: k["last_used_at"] for k in listed} == {
        used: int(earlier.timestamp()), unused["id"]: None}
    assert (await client.get(f"/admin/keys/{used}")).json()["last_used_at"] == int(
        earlier.timestamp())
    revoked = (await client.post(f"/admin/keys/{used}/revoke")).json()
    assert revoked["last_used_at"] == int(earlier.timestamp())


async def test_engines_show_every_replica_to_admins_only(
        setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, _ = setup
    got = await client.get("/admin/engines")
    assert got.status_code == 200, got.text
    [model] = got.json()["data"]
    assert (model["model"], model["replicas"], model["healthy_replicas"]) == ("chat", 2, 0)
    [pool] = model["pools"]
    assert pool["device"] == "cpu"
    assert [r["index"] for r in pool["replicas"]] == [0, 1]
    replica = pool["replicas"][0]
    assert replica["healthy"] is False  # nothing listens there
    assert replica["circuit"]["state"] in ("closed", "open", "half_open")
    assert {"adapters", "kv_cache_usage", "waiting", "running", "in_flight"} <= set(replica)
    _, _, plain = await _tenant_with_key(client, "member")
    denied = await client.get("/admin/engines", headers={"authorization": f"Bearer {plain}"})
    assert denied.status_code == 403 and "admin" in denied.json()["error"]["message"]


async def test_usage_per_day_alone(setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    tenant, key, _ = await _tenant_with_key(client, "t")
    yesterday = datetime.now(UTC) - timedelta(days=1)
    await _record(db, tenant, key, at=yesterday)
    await _record(db, tenant, key)
    await _record(db, tenant, key)
    rows = (await client.get("/v1/usage", params={"group_by": "", "period": "day"})).json()
    assert [(r["period"], r["requests"]) for r in rows["data"]] == [
        (yesterday.strftime("%Y-%m-%d"), 1), (datetime.now(UTC).strftime("%Y-%m-%d"), 2)]
    assert (await client.get("/v1/usage", params={"group_by": ""})).status_code == 400
