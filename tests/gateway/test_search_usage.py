"""A search's query embedding is its caller's model call: priced, recorded in the ledger under
the caller's key with an id derived from the request's, and refused (and recorded as refused)
by the caller's limits. The API in process, on SQLite and a real Redis, with a stand-in
embedding engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select

from gateway.app import create_app, services_of
from gateway.chores import load_prices
from llmops.settings import Settings
from llmops.store import Database, UsageRecord
from tests.databases import REDIS_URL, in_process_gateway
from tests.standin import serve_engine

ADMIN = "sk-unit-search-usage"
DIMENSIONS = 384  # the index's default dense size


async def _embeddings(request: web.Request) -> web.Response:
    texts = (await request.json())["input"]
    return web.json_response({"object": "list", "model": "embed", "usage": {
        "prompt_tokens": 7 * len(texts), "total_tokens": 7 * len(texts)},
        "data": [{"object": "embedding", "index": i, "embedding": [0.05] * DIMENSIONS}
                 for i in range(len(texts))]})


@pytest.fixture
async def engine() -> AsyncIterator[str]:
    async with serve_engine(_embeddings, "/v1/embeddings") as url:
        yield url


async def _rows(db: Database, key_id: str, count: int) -> list[UsageRecord]:
    """The key's final ledger rows once there are `count` (the ledger is written behind)."""
    deadline = time.monotonic() + 20
    while True:
        async with db.session() as session:
            rows = list(await session.scalars(
                select(UsageRecord).where(UsageRecord.key_id == key_id)))
        if len(rows) == count and all(r.status for r in rows):
            return rows
        assert time.monotonic() < deadline, f"{len(rows)} final rows, not {count}"
        await asyncio.sleep(0.05)


async def test_a_search_bills_its_query_embedding_to_the_caller(tmp_path: Path,
                                                               engine: str) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings = Settings(admin_key=ADMIN, database_url=url, redis_url=REDIS_URL,
                        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        retrieval={"path": tmp_path / "qdrant"},
                        models=[{"name": "embed", "kind": "embedding", "context_length": 256,
                                 "pools": [{"device": "cpu", "urls": [engine]}]}])
    app = create_app(settings)
    db = Database(url)
    async with in_process_gateway(settings, ADMIN, app) as client:
        await client.put("/admin/prices/embed", json={"input_per_mtok": 1000.0,
                                                      "output_per_mtok": 0.0})
        await load_prices(db, services_of(app).prices)  # as every gateway's chore does
        tenant = (await client.post("/admin/tenants", json={"name": "searcher"})).json()
        key: dict[str, Any] = (await client.post("/admin/keys", json={
            "tenant_id": tenant["id"], "rpm_limit": 1})).json()
        member = {"authorization": f"Bearer {key['key']}"}
        store = (await client.post("/v1/vector_stores", json={"name": "s"},
                                   headers=member)).json()
        search = f"/v1/vector_stores/{store['id']}/search"
        found = await client.post(search, json={"query": ["kettle", "warranty"]},
                                  headers=member)
        assert found.status_code == 200, found.text
        refused = await client.post(search, json={"query": "kettle"}, headers=member)
        assert refused.status_code == 429  # the key's one request a minute went to the first
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        rows = {r.status: r for r in await _rows(db, key["id"], 2)}
        ok = rows[200]
        assert ok.request_id == found.headers["x-request-id"] + ".search"
        assert (ok.tenant_id, ok.endpoint, ok.model, ok.prompt_tokens) == (
            tenant["id"], "/v1/embeddings", "embed", 14)  # both queries, in one call
        assert float(ok.cost_usd) == pytest.approx(14 * 1000.0 / 1e6)
        assert rows[429].request_id == refused.headers["x-request-id"] + ".search"
        assert rows[429].prompt_tokens == 0
        usage = (await client.get("/admin/usage", params={
            "group_by": "endpoint,model", "key_id": key["id"]})).json()["data"]
        assert [(u["endpoint"], u["model"], u["requests"], u["rejected"], u["prompt_tokens"])
                for u in usage] == [("/v1/embeddings", "embed", 2, 1, 14)]
    await db.close()
