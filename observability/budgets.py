"""Tenants' budgets and their spend as gauges, `llmops_tenant_budget_usd{tenant}` and
`llmops_tenant_spend_usd{tenant}`, so that an alert can warn before a budget is spent instead
of once requests are refused.

Both are read in the background with the gateway's other readings (`GatewayMetrics.refresh`),
in one read of the limiter's state per round (the tenants table and Redis' spend counters).
Tenant labels are bounded like every tenant label (`TenantLabels`): a labelled tenant is a
series of its own, and `other` holds the figures of the unlabelled tenant nearest its budget
(the largest spend over budget), so that `spend / budget` still warns for any tenant.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence

from observability.metrics import Reading
from observability.tenants import OTHER, TenantLabels
from tenancy.limits import BudgetUse, Limiter

__all__ = ["TenantBudgets", "budget_readings"]

Figures = dict[str, BudgetUse]  # by label value


def _used(use: BudgetUse) -> float:
    if use.budget_usd > 0:
        return use.spent_usd / use.budget_usd
    return math.inf if use.spent_usd > 0 else 0.0


class TenantBudgets:
    def __init__(self, read: Callable[[], Awaitable[Sequence[BudgetUse]]],
                 tenants: TenantLabels) -> None:
        self.read = read
        self.tenants = tenants
        self._task: asyncio.Task[Figures] | None = None

    async def figures(self) -> Figures:
        """Budget and spend by tenant label, from a read shared by the calls of one round:
        `GatewayMetrics.refresh` starts a round's readings together (asyncio runs them in
        order before the read they start can end), and the next round finds it done."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._figures())
            # Take the outcome even when every caller timed out, so that none goes unseen.
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._task)

    async def _figures(self) -> Figures:
        out: Figures = {}
        nearest: BudgetUse | None = None
        for use in await self.read():
            label = self.tenants.label(use.tenant_id)
            if label != OTHER:
                out[label] = use
            elif nearest is None or _used(use) > _used(nearest):
                nearest = use
        if nearest is not None:
            out[OTHER] = nearest
        return out

    async def budgets(self) -> dict[str, float]:
        return {label: use.budget_usd for label, use in (await self.figures()).items()}

    async def spend(self) -> dict[str, float]:
        return {label: use.spent_usd for label, use in (await self.figures()).items()}

    def readings(self) -> list[Reading]:
        return [
            Reading("llmops_tenant_budget_usd",
                    "Tenants' budgets for the current period in US dollars (other: the "
                    "unlabelled tenant nearest its budget).", "tenant", self.budgets),
            Reading("llmops_tenant_spend_usd",
                    "Tenants' settled spend in the current budget period in US dollars "
                    "(other: the unlabelled tenant nearest its budget).", "tenant", self.spend),
        ]


def budget_readings(limiter: Limiter, tenants: TenantLabels) -> list[Reading]:
    """The budget gauges of the tenants that have budgets, read through `limiter`."""
    return TenantBudgets(limiter.tenant_budgets, tenants).readings()
