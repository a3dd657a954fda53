"""What each tenant and key with a budget has spent of it this budget period, from the ledger:
for the console's overview and anyone who wants to see how close a budget is to running out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from llmops.store import ApiKey, Database, Tenant
from tenancy.ledger import spend_by
from tenancy.limits import period_start

__all__ = ["BudgetUse", "budget_uses"]


@dataclass(frozen=True)
class BudgetUse:
    scope: str  # tenant | key
    id: str
    tenant_id: str
    name: str
    period: str  # day | month
    budget_usd: float
    spent_usd: float
    period_start: datetime


async def budget_uses(db: Database, tenant_id: str | None = None,
                      now: datetime | None = None) -> list[BudgetUse]:
    """Every enabled tenant and live key that has a budget (`tenant_id`: of that tenant only),
    with what it has spent since its period began: a query per table and one grouped ledger
    query per scope and period, however many there are."""
    now = now or datetime.now(UTC)
    tenants: Any = select(Tenant.id, Tenant.id, Tenant.name, Tenant.budget_period,
                          Tenant.budget_usd).where(Tenant.budget_usd.is_not(None),
                                                   Tenant.disabled_at.is_(None))
    keys: Any = select(ApiKey.id, ApiKey.tenant_id, ApiKey.name, ApiKey.budget_period,
                       ApiKey.budget_usd).where(ApiKey.budget_usd.is_not(None),
                                                ApiKey.revoked_at.is_(None))
    if tenant_id is not None:
        tenants = tenants.where(Tenant.id == tenant_id)
        keys = keys.where(ApiKey.tenant_id == tenant_id)
    async with db.session() as session:
        rows = [("tenant", *r) for r in await session.execute(tenants.order_by(Tenant.name))]
        rows += [("key", *r) for r in await session.execute(keys.order_by(ApiKey.created_at))]
    spent: dict[tuple[str, str], dict[str, float]] = {}
    for scope, period in {(r[0], r[4]) for r in rows}:
        owners = [r[1] for r in rows if r[0] == scope and r[4] == period]
        spent[scope, period] = await spend_by(
            db, "tenant_id" if scope == "tenant" else "key_id", period_start(period, now),
            owners)
    return [BudgetUse(scope, owner, tenant, name, period, float(budget),
                      spent[scope, period].get(owner, 0.0), period_start(period, now))
            for scope, owner, tenant, name, period, budget in rows]
