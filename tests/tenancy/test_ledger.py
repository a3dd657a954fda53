"""The usage ledger on SQLite and PostgreSQL with the real Redis: idempotent, complete when a
writer dies mid-batch, and nothing lost while Redis is down."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis
from sqlalchemy import func, select

from llmops.settings import LedgerConfig
from llmops.store import Database, UsageRecord
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
