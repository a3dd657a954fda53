"""Tenants' budget gauges on the real Redis and SQL store: spend settled by admissions, spend
that only the ledger knows (loaded once), bounded tenant labels, and one read per round."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from llmops.settings import LedgerConfig, LimitsConfig, MetricsConfig
from llmops.store import Database
from observability.budgets import TenantBudgets, budget_readings
from observability.metrics import GatewayMetrics
from tenancy.ledger import LedgerPublisher, LedgerWriter, UsageEvent
from tenancy.limits import BudgetUse, Limiter
from tenancy.tenants import Limits, Principal, Tenancy


async def tenants(db: Database) -> dict[str, str]:
    """Tenant ids by name: three with budgets, one without, one disabled."""
    tenancy = Tenancy(db)
    ids = {}
    for name, limits in (("acme", Limits(budget_usd=100.0)),
                         ("daily", Limits(budget_usd=10.0, budget_period="day")),
                         ("big", Limits(budget_usd=1000.0)),
                         ("free", Limits()),
                         ("gone", Limits(budget_usd=5.0))):
        ids[name] = (await tenancy.create_tenant(name, limits=limits)).id
    await tenancy.disable_tenant(ids["gone"])
    return ids


async def spend(limiter: Limiter, tenant_id: str, budget: float, cost: float,
                period: str = "month") -> None:
    """Spend `cost` the way requests do: reserve, then settle."""
    who = Principal(f"key_{tenant_id}", tenant_id, "member", None, Limits(),
                    Limits(budget_usd=budget, budget_period=period))
    admission = await limiter.admit(who, 1, cost)
    await limiter.settle(admission, 1, cost)


@pytest.fixture
async def limiter(redis: Redis, db: Database, prefix: str) -> Limiter:
    return Limiter(redis, db, prefix, LimitsConfig())


async def test_budgets_and_spend_come_from_redis_and_else_the_ledger_once(
        redis: Redis, db: Database, prefix: str, limiter: Limiter) -> None:
    ids = await tenants(db)
    await spend(limiter, ids["acme"], 100.0, 95.0)
    # The daily tenant spent 4 USD today as the ledger says; Redis knows nothing of it.
    publisher = LedgerPublisher(redis, prefix, spool=Path("/nonexistent"))
    await publisher.publish(UsageEvent("r1", ids["daily"], "key_d", "/v1/chat/completions",
                                       "m", 200, cost_usd=4.0))
    await LedgerWriter(redis, db, prefix, LedgerConfig(block_ms=10)).flush()

    uses = {u.tenant_id: u for u in await limiter.tenant_budgets()}
    assert uses == {ids["acme"]: BudgetUse(ids["acme"], 100.0, 95.0),
                    ids["daily"]: BudgetUse(ids["daily"], 10.0, 4.0),
                    ids["big"]: BudgetUse(ids["big"], 1000.0, 0.0)}
    # Loaded into Redis as admission loads it: the ledger is not read at every round, and
    # admission sees the same figure.
    spent_keys = [k async for k in redis.scan_iter(f"{prefix}:budget:{ids['daily']}:*:spent")]
    assert len(spent_keys) == 1 and float(await redis.get(spent_keys[0]) or 0) == 4.0
    await spend(limiter, ids["daily"], 10.0, 1.5, "day")
    assert {u.tenant_id: u.spent_usd for u in await limiter.tenant_budgets()}[ids["daily"]] \
        == 5.5


async def test_gauges_label_tenants_boundedly_and_read_once_per_round(
        db: Database, limiter: Limiter) -> None:
    ids = await tenants(db)
    await spend(limiter, ids["acme"], 100.0, 92.0)
    await spend(limiter, ids["daily"], 10.0, 3.0, "day")  # 30% used
    await spend(limiter, ids["big"], 1000.0, 500.0)  # 50% used: the unlabelled one nearest
    metrics = GatewayMetrics(MetricsConfig(top_tenants=0, tenants=[ids["acme"]]), [], {})
    reads = 0

    async def read() -> list[BudgetUse]:
        nonlocal reads
        reads += 1
        return await limiter.tenant_budgets()

    metrics.add_readings(TenantBudgets(read, metrics.tenants).readings())
    await metrics.refresh()
    assert reads == 1  # two families, one read of the limiter per round
    families = {f.name: {s.labels["tenant"]: s.value for s in f.samples}
                for f in text_string_to_metric_families(metrics.exposition().decode())
                if f.name.startswith("llmops_tenant_")}
    # A labelled tenant is its own series; `other` is the unlabelled tenant nearest its
    # budget (big: 50%, not daily: 30%), so spend / budget warns for any tenant.
    assert families == {
        "llmops_tenant_budget_usd": {ids["acme"]: 100.0, "other": 1000.0},
        "llmops_tenant_spend_usd": {ids["acme"]: 92.0, "other": 500.0},
    }
    await metrics.refresh()
    assert reads == 2


async def test_the_gateway_reads_budgets_through_its_limiter(db: Database,
                                                              limiter: Limiter) -> None:
    ids = await tenants(db)
    metrics = GatewayMetrics(MetricsConfig(tenants=[ids["daily"]]), [], {})
    metrics.add_readings(budget_readings(limiter, metrics.tenants))
    await metrics.refresh()
    text = metrics.exposition().decode()
    assert f'llmops_tenant_budget_usd{{tenant="{ids["daily"]}"}} 10.0' in text
    assert f'llmops_tenant_spend_usd{{tenant="{ids["daily"]}"}} 0.0' in text


async def test_a_failed_read_leaves_both_families_out_and_is_counted() -> None:
    metrics = GatewayMetrics(MetricsConfig(), [], {})

    async def unreachable() -> list[BudgetUse]:
        raise ConnectionError("Redis is down")

    metrics.add_readings(TenantBudgets(unreachable, metrics.tenants).readings())
    await metrics.refresh()
    text = metrics.exposition().decode()
    assert "llmops_tenant_budget_usd{" not in text and "llmops_tenant_spend_usd{" not in text
    for family in ("llmops_tenant_budget_usd", "llmops_tenant_spend_usd"):
        assert metrics.registry.get_sample_value(
            "llmops_metrics_collect_errors_total", {"family": family}) == 1
