"""The usage ledger on SQLite and PostgreSQL with the real Redis: idempotent, complete when a
writer dies mid-batch, nothing lost while Redis is down, and cached prompt tokens kept."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from redis.asyncio import Redis
from sqlalchemy import func, select

from llmops.settings import LedgerConfig
from llmops.store import Base, Database, UsageRecord, upgrade
from llmops.store.db import sync_url
from tenancy.ledger import LedgerPublisher, LedgerWriter, UsageEvent, usage_report

CONFIG = LedgerConfig(block_ms=10, claim_idle_s=1.0, batch_size=7)


def event(i: int, *, final: bool = True, **fields: object) -> UsageEvent:
    base: dict[str, object] = dict(
        request_id=f"req-{i}", tenant_id=f"ten_{i % 2}", key_id=f"key_{i % 3}",
        endpoint="/v1/chat/completions", model="chat", status=200 if final else 0,
        prompt_tokens=10 + i, completion_tokens=i, cost_usd=0.001 * i, final=final)
    base.update(fields)
    return UsageEvent(**base)  # type: ignore[arg-type]


async def rows(db: Database) -> dict[str, UsageRecord]:
    async with db.session() as session:
        return {r.request_id: r for r in await session.scalars(select(UsageRecord))}


async def test_records_are_written_once_whatever_is_replayed(
        redis: Redis, db: Database, prefix: str, tmp_path: Path) -> None:
    publisher = LedgerPublisher(redis, prefix, tmp_path / "spool")
    writer = LedgerWriter(redis, db, prefix, CONFIG)
    for i in range(20):
        await publisher.publish(event(i, final=False))
        await publisher.publish(event(i))
    await writer.flush()
    for i in range(20):  # a replay of everything, ends before starts this time
        await publisher.publish(event(i))
        await publisher.publish(event(i, final=False))
    await writer.flush()
    written = await rows(db)
    assert len(written) == 20
    assert all(r.status == 200 for r in written.values())  # a late start never undoes an end
    assert sum(r.completion_tokens for r in written.values()) == sum(range(20))
    assert await redis.xlen(f"{prefix}:usage") == 0  # acknowledged records leave the stream


async def test_a_start_without_an_end_still_leaves_one_record(
        redis: Redis, db: Database, prefix: str, tmp_path: Path) -> None:
    publisher = LedgerPublisher(redis, prefix, tmp_path / "spool")
    await publisher.publish(event(1, final=False))  # the gateway died before the end
    await LedgerWriter(redis, db, prefix, CONFIG).flush()
    assert [r.status for r in (await rows(db)).values()] == [0]


async def test_a_writer_that_dies_mid_batch_is_taken_over(
        redis: Redis, db: Database, prefix: str, tmp_path: Path) -> None:
    publisher = LedgerPublisher(redis, prefix, tmp_path / "spool")
    for i in range(10):
        await publisher.publish(event(i))
    doomed = LedgerWriter(redis, db, prefix, CONFIG)
    doomed.consumer = "doomed"
    await doomed._ensure_group()
    taken = await doomed._read_new()  # read, then "killed" before writing
    assert len(taken) == 7
    survivor = LedgerWriter(redis, db, prefix, CONFIG)
    await survivor.flush()  # the 3 unread ones
    assert len(await rows(db)) == 3
    await asyncio.sleep(CONFIG.claim_idle_s)
    await survivor.flush()  # and, once stale, the 7 the dead writer held
    assert len(await rows(db)) == 10


async def test_records_wait_in_a_spool_while_redis_is_down(
        redis: Redis, db: Database, prefix: str, tmp_path: Path) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2,
                          socket_connect_timeout=0.2)
    spool = tmp_path / "spool"
    down = LedgerPublisher(dead, prefix, spool)
    for i in range(5):
        await down.publish(event(i))
    await dead.aclose()
    assert len(spool.read_bytes().splitlines()) == 5
    assert spool.stat().st_mode & 0o077 == 0
    back = LedgerPublisher(redis, prefix, spool)
    assert await back.drain_spool() == 5
    assert not spool.exists()
    await LedgerWriter(redis, db, prefix, CONFIG).flush()
    assert len(await rows(db)) == 5


async def test_usage_report_groups_and_periods(
        redis: Redis, db: Database, prefix: str, tmp_path: Path) -> None:
    publisher = LedgerPublisher(redis, prefix, tmp_path / "spool")
    yesterday = (datetime.now(UTC) - timedelta(days=1)).timestamp()
    for i in range(6):
        await publisher.publish(event(i, created_at=yesterday if i < 2 else
                                      datetime.now(UTC).timestamp()))
    await LedgerWriter(redis, db, prefix, CONFIG).flush()
    by_tenant = await usage_report(db, group_by=("tenant_id",))
    assert [(r["tenant_id"], r["requests"]) for r in by_tenant] == [("ten_0", 3), ("ten_1", 3)]
    assert sum(r["completion_tokens"] for r in by_tenant) == 15
    assert sum(r["unfinished"] for r in by_tenant) == 0
    assert abs(sum(r["cost_usd"] for r in by_tenant) - 0.015) < 1e-9
    daily = await usage_report(db, group_by=("model",), period="day")
    assert [r["requests"] for r in daily] == [2, 4]
    only = await usage_report(db, group_by=("key_id",), tenant_id="ten_1")
    assert sum(r["requests"] for r in only) == 3
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(UsageRecord)) == 6


async def test_cached_tokens_are_recorded_and_reported_next_to_prompt_tokens(
        redis: Redis, db: Database, prefix: str, tmp_path: Path) -> None:
    publisher = LedgerPublisher(redis, prefix, tmp_path / "spool")
    await publisher.publish(event(1, final=False))
    await publisher.publish(event(1, prompt_tokens=900, cached_tokens=768))
    await publisher.publish(event(2, prompt_tokens=40, cached_tokens=0))
    # Across a rolling upgrade: a record of a gateway from before cached tokens were counted,
    # and one of a newer gateway with a field unknown here.
    old = orjson.loads(event(3, prompt_tokens=50).to_json())
    del old["cached_tokens"]
    new = {**orjson.loads(event(4, prompt_tokens=0).to_json()), "from_the_future": 1}
    for record in (old, new):
        await redis.xadd(f"{prefix}:usage", {"r": orjson.dumps(record)})
    await LedgerWriter(redis, db, prefix, CONFIG).flush()
    written = await rows(db)
    assert {i: r.cached_tokens for i, r in written.items()} == {
        "req-1": 768, "req-2": 0, "req-3": 0, "req-4": 0}
    [report] = await usage_report(db, group_by=("model",))
    assert (report["prompt_tokens"], report["cached_tokens"]) == (990, 768)


def test_the_migration_matches_the_ledger_and_price_models(database_url: str) -> None:
    upgrade(database_url)
    engine = sqlalchemy.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert [d for d in diff if "usage_records" in repr(d) or "model_prices" in repr(d)] == []
