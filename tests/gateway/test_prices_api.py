"""Model prices set by admins, with the price of cached prompt tokens: stored, listed, loaded by
every gateway's price chore, unset again by a price that leaves it out, and bad values refused
in OpenAI's error shape. The API in process, on SQLite."""

from __future__ import annotations

import uuid
from pathlib import Path

from gateway.chores import load_prices
from llmops.settings import Settings
from llmops.store import Database
from tenancy.accounting import PriceBook
from tenancy.pricing import Price
from tests.databases import REDIS_URL, in_process_gateway

ADMIN = "sk-unit-prices"
DEAD = "http://127.0.0.1:9"  # no engine is called


async def test_cached_input_price_is_set_listed_loaded_and_unset(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings = Settings(admin_key=ADMIN, database_url=url, redis_url=REDIS_URL,
                        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        retrieval={"path": tmp_path / "qdrant"},
                        models=[{"name": "chat", "kind": "chat",
                                 "pools": [{"device": "cpu", "urls": [DEAD]}]}])
    db = Database(url)
    async with in_process_gateway(settings, ADMIN) as client:
        put = await client.put("/admin/prices/chat", json={
            "input_per_mtok": 2.0, "output_per_mtok": 8.0, "cached_input_per_mtok": 0.5})
        assert put.status_code == 200, put.text
        assert put.json()["cached_input_per_mtok"] == 0.5
        await client.put("/admin/prices/other", json={"input_per_mtok": 1.0,
                                                      "output_per_mtok": 1.0})
        listed = (await client.get("/admin/prices")).json()["data"]
        assert [(p["model"], p["cached_input_per_mtok"]) for p in listed] == [
            ("chat", 0.5), ("other", None)]
        book = PriceBook()
        await load_prices(db, book)  # what every gateway's chore loads
        assert book.prices == {"chat": Price(2.0, 8.0, 0.5), "other": Price(1.0, 1.0)}

        bad = await client.put("/admin/prices/chat", json={
            "input_per_mtok": 2.0, "output_per_mtok": 8.0, "cached_input_per_mtok": -1})
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "cached_input_per_mtok"

        # A price that leaves it out: cached tokens cost the input price again.
        await client.put("/admin/prices/chat", json={"input_per_mtok": 3.0,
                                                     "output_per_mtok": 8.0})
        listed = (await client.get("/admin/prices")).json()["data"]
        assert listed[0] == {"model": "chat", "input_per_mtok": 3.0, "output_per_mtok": 8.0,
                             "cached_input_per_mtok": None, "training_per_mtok": None}
        await load_prices(db, book)
        assert book.prices["chat"] == Price(3.0, 8.0)
    await db.close()
