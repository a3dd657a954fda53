"""Guardrail policies and events in the SQL store, on SQLite and PostgreSQL: policies set on
tenants and keys come back with the key's principal (so the request path needs no query of its
own), the ledger keeps what guardrails did, and the migration matches the models."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from redis.asyncio import Redis
from sqlalchemy import select

from llmops.settings import LedgerConfig
from llmops.store import Base, Database, UsageRecord, upgrade
from llmops.store.db import sync_url
from tenancy.ledger import LedgerPublisher, LedgerWriter, UsageEvent
from tenancy.tenants import Tenancy


async def test_policies_come_back_with_the_principal(db: Database) -> None:
    tenants = Tenancy(db)
    team = await tenants.create_tenant("guarded", guardrails={"input": {"card": "block"},
                                                              "max_messages": 10})
    _, plain = await tenants.create_key(team.id, guardrails={"input": {"email": "redact"}})
    _, bare = await tenants.create_key(team.id)
    who = await tenants.principal(plain)
    assert who is not None and who.tenant_guardrails is not None
    assert (who.tenant_guardrails.input.card, who.tenant_guardrails.max_messages) == ("block",
                                                                                      10)
    assert who.key_guardrails is not None and who.key_guardrails.input.email == "redact"
    other = await tenants.principal(bare)
    assert other is not None and other.key_guardrails is None
    await tenants.update_tenant(team.id, guardrails=None)
    who = await tenants.principal(plain)
    assert who is not None and who.tenant_guardrails is None


async def test_the_ledger_keeps_what_guardrails_did(redis: Redis, db: Database, prefix: str,
                                                    tmp_path: Path) -> None:
    did = [{"stage": "input", "category": "card", "action": "redact", "count": 2},
           {"stage": "input", "category": "deny_pattern", "action": "block", "count": 1,
            "rule": "jailbreak"}]
    publisher = LedgerPublisher(redis, prefix, tmp_path / "spool")
    common = {"tenant_id": "ten_a", "key_id": "key_a", "endpoint": "/v1/chat/completions",
              "model": "chat"}
    await publisher.publish(UsageEvent(request_id="guarded", status=0, final=False, **common))
    await publisher.publish(UsageEvent(request_id="guarded", status=400, guardrails=did,
                                       **common))
    await publisher.publish(UsageEvent(request_id="plain", status=200, **common))
    await LedgerWriter(redis, db, prefix, LedgerConfig(block_ms=10)).flush()
    async with db.session() as session:
        rows = {r.request_id: r for r in await session.scalars(select(UsageRecord))}
    assert rows["guarded"].guardrails == did and rows["guarded"].status == 400
    assert rows["plain"].guardrails is None
    async with db.engine.connect() as conn:  # SQL NULL, not a JSON null
        nulls = await conn.scalar(sqlalchemy.text(
            "SELECT count(*) FROM usage_records WHERE guardrails IS NULL"))
    assert nulls == 1


def test_the_migration_matches_the_models(database_url: str) -> None:
    upgrade(database_url)
    engine = sqlalchemy.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert [d for d in diff if "guardrails" in repr(d)] == []
