"""Usage from the ledger: `GET /v1/usage` (an llmops extension to OpenAI's API) serves any key
its own tenant's usage and an admin everyone's; `GET /v1/usage/budgets` how much of each budget
this period has used. `/admin/usage` shares the query (`usage_query`), so both read the same
parameters the same way."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from starlette.requests import Request

from gateway.http.auth import Authenticated
from gateway.http.timestamps import epoch
from llmops.errors import BadRequestError
from llmops.store import Database
from tenancy import Principal
from tenancy.budgets import budget_uses
from tenancy.ledger import usage_report

__all__ = ["GROUPS", "Period", "UsageQuery", "usage_query", "usage_router"]

Period = Literal["day", "month"]
GROUPS = ("tenant_id", "key_id", "model", "adapter", "pool", "endpoint")


@dataclass(frozen=True)
class UsageQuery:
    group_by: tuple[str, ...]
    period: Period | None = None
    tenant_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    start: datetime | None = None
    end: datetime | None = None

    async def run(self, db: Database) -> dict[str, Any]:
        rows = await usage_report(db, group_by=self.group_by, period=self.period,
                                  tenant_id=self.tenant_id, key_id=self.key_id,
                                  model=self.model, start=self.start, end=self.end)
        return {"object": "list", "data": rows}


def usage_query(
    group_by: Annotated[str, Query(description="Comma-separated: tenant_id, key_id, model, "
                                               "adapter, pool, endpoint (training is "
                                               "/v1/fine_tuning/jobs); empty with a "
                                               "period: totals per period")] = "tenant_id",
    period: Annotated[Period | None, Query(description="Also per day or month (UTC): each "
                                                       "row's `period`.")] = None,
    tenant_id: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    start: Annotated[datetime | None, Query(description="From this time on (inclusive).")
                     ] = None,
    end: Annotated[datetime | None, Query(description="Before this time.")] = None,
) -> UsageQuery:
    """The usage parameters, read once for every usage endpoint."""
    groups = tuple(dict.fromkeys(g.strip() for g in group_by.split(",") if g.strip()))
    if not set(groups) <= set(GROUPS) or not (groups or period):
        raise BadRequestError(f"group_by must name some of {list(GROUPS)} (it may be empty "
                              "with a period)", param="group_by")
    if start is not None and end is not None and end <= start:
        raise BadRequestError("end must come after start", param="end")
    return UsageQuery(groups, period, tenant_id, key_id, model, start, end)


def usage_router(db: Database, principal: Authenticated) -> APIRouter:
    router = APIRouter(prefix="/v1/usage", tags=["usage"], dependencies=[Depends(principal)])

    @router.get("")
    async def usage(request: Request, query: Annotated[UsageQuery, Depends(usage_query)]
                    ) -> dict[str, Any]:
        """Requests, tokens and cost per group (and per day or month). A member key sees its
        own tenant's usage whatever `tenant_id` it sends."""
        who: Principal = request.state.principal
        if not who.is_admin:
            query = replace(query, tenant_id=who.tenant_id)
        return await query.run(db)

    @router.get("/budgets")
    async def budgets(request: Request, tenant_id: str | None = None) -> dict[str, Any]:
        """Each budget and what it has spent this period. A member key sees its tenant's budget
        and its own."""
        who: Principal = request.state.principal
        uses = await budget_uses(db, tenant_id if who.is_admin else who.tenant_id)
        if not who.is_admin:
            uses = [u for u in uses if u.scope == "tenant" or u.id == who.key_id]
        return {"object": "list", "data": [
            {"object": "budget", "scope": u.scope, "id": u.id, "tenant_id": u.tenant_id,
             "name": u.name, "period": u.period, "budget_usd": u.budget_usd,
             "spent_usd": u.spent_usd, "period_start": epoch(u.period_start)} for u in uses]}

    return router
