"""Evals, their runs and the runs' output items in the SQL store (OpenAI's Evals API).

Everything a tenant asks for is scoped to it: another tenant's eval, run or item is reported
as missing. A run is executed by one worker at a time under a lease, as fine-tuning jobs are:
a worker claims it with one conditional UPDATE and renews the lease with heartbeats. Each
graded item is stored together with the run's updated tallies in one transaction that only
the lease holder can commit, so a run whose worker died resumes elsewhere without grading an
item twice and without counting one twice. Cancellation is a flag the worker reads at its
heartbeats.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import Select, delete, func, select, text, update

from llmops.store import Database, Eval, EvalOutputItem, EvalRun, utcnow
from llmops.store.leases import stop_unfinished
from tenancy.tenants import NotFoundError

__all__ = [
    "ACTIVE",
    "RUN_STATUSES",
    "TERMINAL",
    "Evals",
    "ItemOutcome",
    "RunLimitError",
    "pass_ratios",
]

ACTIVE = ("queued", "in_progress")
TERMINAL = ("completed", "failed", "canceled")
RUN_STATUSES = ACTIVE + TERMINAL

Order = Literal["asc", "desc"]

_RUN_LOCK = 72_100_009  # pg_advisory_xact_lock id: bounded run creations counted one at a time


class RunLimitError(ValueError):
    """The tenant has as many runs queued or in progress as it may."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Your organization has {limit} eval runs queued or in progress, the "
                         "most it may have; wait for one to finish or cancel one.")


@dataclass(frozen=True)
class ItemOutcome:
    """One graded data item, as a worker hands it to the store."""

    index: int  # the item's position in the run's data source (datasource_item_id)
    item: dict[str, Any]
    sample: dict[str, Any]
    results: list[dict[str, Any]]  # one per testing criterion: name, passed, score, error...
    status: Literal["pass", "fail", "error"]
    usage: dict[str, dict[str, int]]  # model -> prompt/completion/total/cached tokens, calls


def pass_ratios(run: EvalRun) -> dict[str, float]:
    """Each criterion's share of the run's graded items that passed it. Items that errored
    (their sample or their grade) count as not passed: a model that fails to answer must not
    look better for it. Empty until an item is done.

    The metric hook of regression watching: a scheduled or watched eval exports these as
    gauges labelled by its watch (a bounded, admin-chosen name), never by eval name or id,
    which are user strings of unbounded number."""
    done = run.passed + run.failed + run.errored
    if done == 0:
        return {}
    return {name: int(c.get("passed", 0)) / done for name, c in run.per_criteria.items()}


def _cursor_filter(query: Select[Any], column: Any, tie: Any, value: Any, tie_value: Any,
                   order: Order) -> Select[Any]:
    """Rows after the cursor row in the listing's order; ties broken by id."""
    if order == "asc":
        return query.where((column > value) | ((column == value) & (tie > tie_value)))
    return query.where((column < value) | ((column == value) & (tie < tie_value)))


def _add_usage(total: dict[str, Any], usage: dict[str, dict[str, int]]) -> dict[str, Any]:
    merged = {model: dict(counts) for model, counts in total.items()}
    for model, counts in usage.items():
        into = merged.setdefault(model, {})
        for name, value in counts.items():
            into[name] = int(into.get(name, 0)) + int(value)
    return merged


def _add_results(total: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per criterion: passed, failed and errored counts, and the sum of the scores (a mean
    score, such as a retrieval run's MRR, needs no pass over the items)."""
    merged = {name: dict(counts) for name, counts in total.items()}
    for r in results:
        counts = merged.setdefault(r["name"], {"passed": 0, "failed": 0, "errored": 0})
        key = "errored" if r.get("error") else "passed" if r.get("passed") else "failed"
        counts[key] = int(counts.get(key, 0)) + 1
        score = r.get("score")
        if isinstance(score, int | float) and not r.get("error"):
            counts["score_sum"] = float(counts.get("score_sum", 0.0)) + float(score)
    return merged


class Evals:
    def __init__(self, db: Database) -> None:
        self.db = db

    # Evals

    async def create(self, *, tenant_id: str, key_id: str, name: str,
                     metadata: dict[str, Any], data_source_config: dict[str, Any],
                     testing_criteria: list[dict[str, Any]]) -> Eval:
        now = utcnow()
        row = Eval(id="eval_" + secrets.token_hex(16), tenant_id=tenant_id, key_id=key_id,
                   name=name, metadata_=metadata, data_source_config=data_source_config,
                   testing_criteria=testing_criteria, created_at=now, updated_at=now)
        async with self.db.session() as session:
            session.add(row)
            await session.commit()
        return row

    async def get(self, tenant_id: str, eval_id: str) -> Eval:
        """An eval of this tenant; another tenant's eval is reported as missing."""
        async with self.db.session() as session:
            row = await session.get(Eval, eval_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"Eval with id '{eval_id}' not found.")
        return row

    async def list_evals(self, tenant_id: str, *, limit: int = 20, after: str | None = None,
                         order: Order = "asc",
                         order_by: Literal["created_at", "updated_at"] = "created_at"
                         ) -> tuple[list[Eval], bool]:
        column = Eval.created_at if order_by == "created_at" else Eval.updated_at
        query = select(Eval).where(Eval.tenant_id == tenant_id)
        if after is not None:
            cursor = await self.get(tenant_id, after)
            query = _cursor_filter(query, column, Eval.id, getattr(cursor, order_by),
                                   cursor.id, order)
        by = (column.asc(), Eval.id.asc()) if order == "asc" else (column.desc(),
                                                                   Eval.id.desc())
        async with self.db.session() as session:
            rows = list(await session.scalars(query.order_by(*by).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    async def update(self, tenant_id: str, eval_id: str, *, name: str | None = None,
                     metadata: dict[str, Any] | None = None) -> Eval:
        await self.get(tenant_id, eval_id)
        values: dict[str, Any] = {"updated_at": utcnow()}
        if name is not None:
            values["name"] = name
        if metadata is not None:
            values["metadata_"] = metadata
        async with self.db.session() as session:
            await session.execute(update(Eval).where(Eval.id == eval_id).values(**values))
            await session.commit()
        return await self.get(tenant_id, eval_id)

    async def delete(self, tenant_id: str, eval_id: str) -> None:
        """The eval goes with its runs and their items; a worker running one of them loses
        its lease (the row is gone) and stops at its next heartbeat."""
        await self.get(tenant_id, eval_id)
        async with self.db.session() as session:
            runs = select(EvalRun.id).where(EvalRun.eval_id == eval_id).scalar_subquery()
            await session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id.in_(runs)))
            await session.execute(delete(EvalRun).where(EvalRun.eval_id == eval_id))
            await session.execute(delete(Eval).where(Eval.id == eval_id))
            await session.commit()

    # Runs

    async def create_run(self, ev: Eval, *, key_id: str, name: str, model: str,
                         data_source: dict[str, Any], metadata: dict[str, Any],
                         items_total: int, max_active: int | None = None) -> EvalRun:
        """A queued run of `ev`. With `max_active`, raises RunLimitError when the tenant
        already has that many runs queued or in progress."""
        row = EvalRun(id="evalrun_" + secrets.token_hex(16), eval_id=ev.id,
                      tenant_id=ev.tenant_id, key_id=key_id, name=name, model=model,
                      data_source=data_source, metadata_=metadata, items_total=items_total,
                      per_criteria={}, per_model_usage={})
        async with self.db.session() as session:
            if max_active is not None and self.db.engine.dialect.name == "postgresql":
                await session.execute(text("SELECT pg_advisory_xact_lock(:id)"),
                                      {"id": _RUN_LOCK})
            # Written first, counted after: on SQLite the write takes the database for the
            # transaction, so two creations cannot both see room for one more.
            session.add(row)
            await session.flush()
            active = select(func.count()).select_from(EvalRun).where(
                EvalRun.tenant_id == ev.tenant_id, EvalRun.status.in_(ACTIVE))
            if max_active is not None and int(await session.scalar(active) or 0) > max_active:
                await session.rollback()
                raise RunLimitError(max_active)
            await session.commit()
        return row

    async def get_run(self, tenant_id: str, eval_id: str, run_id: str) -> EvalRun:
        async with self.db.session() as session:
            row = await session.get(EvalRun, run_id)
        if row is None or row.tenant_id != tenant_id or row.eval_id != eval_id:
            raise NotFoundError(f"Run with id '{run_id}' not found.")
        return row

    async def run(self, run_id: str) -> EvalRun | None:
        """A run by id alone, for its worker."""
        async with self.db.session() as session:
            return await session.get(EvalRun, run_id)

    async def list_runs(self, tenant_id: str, eval_id: str, *, limit: int = 20,
                        after: str | None = None, order: Order = "asc",
                        status: str | None = None) -> tuple[list[EvalRun], bool]:
        await self.get(tenant_id, eval_id)
        query = select(EvalRun).where(EvalRun.eval_id == eval_id)
        if status is not None:
            query = query.where(EvalRun.status == status)
        if after is not None:
            cursor = await self.get_run(tenant_id, eval_id, after)
            query = _cursor_filter(query, EvalRun.created_at, EvalRun.id, cursor.created_at,
                                   cursor.id, order)
        by = ((EvalRun.created_at.asc(), EvalRun.id.asc()) if order == "asc"
              else (EvalRun.created_at.desc(), EvalRun.id.desc()))
        async with self.db.session() as session:
            rows = list(await session.scalars(query.order_by(*by).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    async def active_runs(self, tenant_id: str) -> int:
        """Runs of the tenant that are queued or running: bounded per tenant."""
        query = select(func.count()).select_from(EvalRun).where(
            EvalRun.tenant_id == tenant_id, EvalRun.status.in_(ACTIVE))
        async with self.db.session() as session:
            return int(await session.scalar(query) or 0)

    async def cancel_run(self, tenant_id: str, eval_id: str, run_id: str) -> EvalRun:
        """Cancel at once when no worker holds the run, else ask its worker to stop."""
        run = await self.get_run(tenant_id, eval_id, run_id)
        if run.status in TERMINAL:
            return run
        now = utcnow()
        async with self.db.session() as session:
            unheld = await session.execute(
                update(EvalRun)
                .where(EvalRun.id == run_id, EvalRun.status.in_(ACTIVE),
                       EvalRun.lease_owner.is_(None) | (EvalRun.lease_expires_at < now))
                .values(status="canceled", finished_at=now, cancel_requested=True,
                        lease_owner=None, lease_expires_at=None))
            if unheld.rowcount == 0:  # type: ignore[attr-defined]
                await session.execute(update(EvalRun).where(EvalRun.id == run_id)
                                      .values(cancel_requested=True))
            await session.commit()
        return await self.get_run(tenant_id, eval_id, run_id)

    async def stop_tenant(self, tenant_id: str) -> list[str]:
        """Stop a tenant's unfinished runs (before it is deleted): those no worker holds are
        canceled at once, so none can take them; those a worker holds are asked to stop.
        Returns the ids of those a worker still holds."""
        mine = (EvalRun.tenant_id == tenant_id) & EvalRun.status.in_(ACTIVE)
        async with self.db.session() as session:
            held = await stop_unfinished(session, EvalRun, mine, status="canceled",
                                         finished_at=utcnow())
            await session.commit()
        return held

    async def forget_tenant(self, tenant_id: str) -> int:
        """Remove every eval of a deleted tenant with its runs and output items (children
        first; its watches go first of all: `EvalWatches.forget_tenant`); returns how many
        evals."""
        async with self.db.session() as session:
            await session.execute(delete(EvalOutputItem)
                                  .where(EvalOutputItem.tenant_id == tenant_id))
            await session.execute(delete(EvalRun).where(EvalRun.tenant_id == tenant_id))
            gone = await session.execute(delete(Eval).where(Eval.tenant_id == tenant_id))
            await session.commit()
        return int(gone.rowcount)  # type: ignore[attr-defined]

    async def delete_run(self, tenant_id: str, eval_id: str, run_id: str) -> None:
        await self.get_run(tenant_id, eval_id, run_id)
        async with self.db.session() as session:
            await session.execute(delete(EvalOutputItem)
                                  .where(EvalOutputItem.run_id == run_id))
            await session.execute(delete(EvalRun).where(EvalRun.id == run_id))
            await session.commit()

    # Output items

    async def list_items(self, tenant_id: str, eval_id: str, run_id: str, *,
                         limit: int = 20, after: str | None = None, order: Order = "asc",
                         status: str | None = None) -> tuple[list[EvalOutputItem], bool]:
        """In the order of the data source; `status` is pass, fail or error."""
        await self.get_run(tenant_id, eval_id, run_id)
        query = select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)
        if status is not None:
            query = query.where(EvalOutputItem.status == status)
        if after is not None:
            cursor = await self.get_item(tenant_id, eval_id, run_id, after)
            column = EvalOutputItem.datasource_item_id
            query = query.where(column > cursor.datasource_item_id if order == "asc"
                                else column < cursor.datasource_item_id)
        by = (EvalOutputItem.datasource_item_id.asc() if order == "asc"
              else EvalOutputItem.datasource_item_id.desc())
        async with self.db.session() as session:
            rows = list(await session.scalars(query.order_by(by).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    async def get_item(self, tenant_id: str, eval_id: str, run_id: str, item_id: str
                       ) -> EvalOutputItem:
        async with self.db.session() as session:
            row = await session.get(EvalOutputItem, item_id)
        if (row is None or row.tenant_id != tenant_id or row.run_id != run_id
                or row.eval_id != eval_id):
            raise NotFoundError(f"Output item with id '{item_id}' not found.")
        return row

    async def done_items(self, run_id: str) -> set[int]:
        """Indexes of the items a run already graded (a resumed run skips them)."""
        query = select(EvalOutputItem.datasource_item_id).where(
            EvalOutputItem.run_id == run_id)
        async with self.db.session() as session:
            return set(await session.scalars(query))

    # The lease, for workers

    async def claim(self, run_id: str, owner: str, lease_s: float) -> EvalRun | None:
        """Take the run if nobody holds it (or the holder's lease ran out); None otherwise."""
        now = utcnow()
        async with self.db.session() as session:
            claimed = await session.execute(
                update(EvalRun)
                .where(EvalRun.id == run_id, EvalRun.status.in_(ACTIVE),
                       EvalRun.cancel_requested.is_(False),
                       EvalRun.lease_owner.is_(None) | (EvalRun.lease_expires_at < now))
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                        attempts=EvalRun.attempts + 1))
            await session.commit()
        return await self.run(run_id) if claimed.rowcount else None  # type: ignore[attr-defined]

    async def heartbeat(self, run_id: str, owner: str, lease_s: float) -> bool:
        """Renew the lease; False when the run should stop (canceled, deleted, lease lost)."""
        async with self.db.session() as session:
            renewed = await session.execute(
                update(EvalRun)
                .where(EvalRun.id == run_id, EvalRun.lease_owner == owner,
                       EvalRun.cancel_requested.is_(False))
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
            await session.commit()
        return bool(renewed.rowcount)  # type: ignore[attr-defined]

    async def update_run(self, run_id: str, owner: str, **values: Any) -> bool:
        """Change a held run (status, error); a worker that lost the lease changes nothing."""
        if values.get("status") in TERMINAL:
            values.update(finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
        async with self.db.session() as session:
            done = await session.execute(
                update(EvalRun).where(EvalRun.id == run_id, EvalRun.lease_owner == owner)
                .values(**values))
            await session.commit()
        return bool(done.rowcount)  # type: ignore[attr-defined]

    async def record(self, run_id: str, owner: str, outcome: ItemOutcome) -> bool:
        """Store one graded item and add it to the run's tallies, in one transaction that
        only the lease holder commits; False (nothing stored) when the lease is lost or the
        item was stored before."""
        column = {"pass": EvalRun.passed, "fail": EvalRun.failed,
                  "error": EvalRun.errored}[outcome.status]
        async with self.db.session() as session:
            # A write first: it takes the row (PostgreSQL) or the database (SQLite) for the
            # transaction, so what is read next cannot change before the commit.
            held = await session.execute(
                update(EvalRun).where(EvalRun.id == run_id, EvalRun.lease_owner == owner)
                .values({column: column + 1}))
            if held.rowcount == 0:  # type: ignore[attr-defined]
                return False
            seen = await session.scalar(select(EvalOutputItem.id).where(
                EvalOutputItem.run_id == run_id,
                EvalOutputItem.datasource_item_id == outcome.index))
            if seen is not None:
                await session.rollback()
                return False
            run = (await session.execute(
                select(EvalRun.eval_id, EvalRun.tenant_id, EvalRun.per_criteria,
                       EvalRun.per_model_usage).where(EvalRun.id == run_id))).one()
            await session.execute(update(EvalRun).where(EvalRun.id == run_id).values(
                per_criteria=_add_results(run.per_criteria, outcome.results),
                per_model_usage=_add_usage(run.per_model_usage, outcome.usage)))
            session.add(EvalOutputItem(
                id="outputitem_" + secrets.token_hex(14), run_id=run_id, eval_id=run.eval_id,
                tenant_id=run.tenant_id, datasource_item_id=outcome.index,
                datasource_item=outcome.item, sample=outcome.sample, results=outcome.results,
                status=outcome.status))
            await session.commit()
        return True

    async def orphaned(self, unclaimed_for: timedelta = timedelta(minutes=1)) -> list[str]:
        """Active runs no worker holds, to be queued again: those whose worker stopped renewing
        its lease, and those no worker claimed within `unclaimed_for` of their creation."""
        now = utcnow()
        query = select(EvalRun.id).where(
            EvalRun.status.in_(ACTIVE),
            (EvalRun.lease_owner.is_not(None) & (EvalRun.lease_expires_at < now))
            | (EvalRun.lease_owner.is_(None) & (EvalRun.created_at < now - unclaimed_for)))
        async with self.db.session() as session:
            return list(await session.scalars(query))
