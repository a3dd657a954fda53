"""Regression watches in the SQL store: an eval run against a model every `interval_s`, whose
pass rates are compared with a threshold (`min_pass_rate`) and with an accepted run (the
baseline, less `tolerance`).

A watch is tenant-scoped like its eval (another tenant's is reported as missing) and named by
a short slug, unique per tenant, that is its metric label; how many watches there may be, per
tenant and in all, is bounded so that those labels stay bounded. Several gateways may look for
due watches at once: each claims a watch with one conditional UPDATE of `next_run_at`, so
exactly one of them starts the run. The runs themselves are ordinary eval runs; the store only
remembers the latest one started, the latest one completed and the accepted one. The first
completed run is accepted by itself (`observe`); any completed run of the eval may be accepted
instead.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from evals.store import ACTIVE
from llmops.store import Database, Eval, EvalRun, EvalWatch, aware, utcnow
from tenancy.tenants import ConflictError, NotFoundError

__all__ = [
    "NAME_PATTERN",
    "UPDATABLE",
    "EvalWatches",
    "InvalidRunError",
    "WatchLimitError",
    "WatchView",
    "pass_rate",
]

NAME_PATTERN = re.compile(r"^[a-z0-9_-]{1,48}$")
# What an update may change; everything else of a watch is fixed at creation.
UPDATABLE = frozenset({"interval_s", "min_pass_rate", "tolerance", "enabled",
                       "accepted_run_id"})
_CREATE_LOCK = 72_100_008  # pg_advisory_xact_lock id: creations counted one at a time


class WatchLimitError(ValueError):
    """The tenant, or the platform, has as many watches as it may."""


class InvalidRunError(ValueError):
    """A run named as the accepted one is not a completed run of the watch's eval."""


def pass_rate(run: EvalRun) -> float | None:
    """Share of the run's graded items that passed every criterion (an item that errored did
    not); None until an item is graded."""
    done = run.passed + run.failed + run.errored
    return run.passed / done if done else None


@dataclass(frozen=True)
class WatchView:
    """A watch with the runs its state names: as the API shows it and the metrics export it."""

    watch: EvalWatch
    last_run: EvalRun | None  # the newest run started
    latest: EvalRun | None  # the newest completed run
    accepted: EvalRun | None

    @property
    def regressed(self) -> bool:
        """The latest completed run passes less than the accepted one, less the tolerance."""
        latest = pass_rate(self.latest) if self.latest else None
        accepted = pass_rate(self.accepted) if self.accepted else None
        return (latest is not None and accepted is not None
                and latest < accepted - self.watch.tolerance)

    @property
    def below_threshold(self) -> bool:
        latest = pass_rate(self.latest) if self.latest else None
        floor = self.watch.min_pass_rate
        return latest is not None and floor is not None and latest < floor


class EvalWatches:
    def __init__(self, db: Database) -> None:
        self.db = db

    # The API's side

    async def create(self, ev: Eval, *, key_id: str, name: str, model: str,
                     data_source: dict[str, Any], interval_s: int,
                     min_pass_rate: float | None, tolerance: float, enabled: bool,
                     max_per_tenant: int, max_total: int) -> EvalWatch:
        """A new watch of `ev`, first due after one interval (the API starts its first run
        itself). Raises ConflictError when the tenant has a watch of that name, and
        WatchLimitError when it, or the platform, has as many watches as it may."""
        now = utcnow()
        row = EvalWatch(id="evalwatch_" + secrets.token_hex(12), tenant_id=ev.tenant_id,
                        key_id=key_id, eval_id=ev.id, name=name, model=model,
                        data_source=data_source, interval_s=interval_s,
                        min_pass_rate=min_pass_rate, tolerance=tolerance, enabled=enabled,
                        enabled_at=now, next_run_at=now + timedelta(seconds=interval_s),
                        skipped_runs=0, created_at=now, updated_at=now)
        async with self.db.session() as session:
            if self.db.engine.dialect.name == "postgresql":
                await session.execute(text("SELECT pg_advisory_xact_lock(:id)"),
                                      {"id": _CREATE_LOCK})
            # Written first, counted after: on SQLite the write takes the database for the
            # transaction, so two creations cannot both see room for one more.
            session.add(row)
            try:
                await session.flush()
            except IntegrityError:
                await session.rollback()
                raise ConflictError(f"A watch named '{name}' already exists.") from None
            mine = await session.scalar(select(func.count()).select_from(EvalWatch)
                                        .where(EvalWatch.tenant_id == ev.tenant_id))
            total = await session.scalar(select(func.count()).select_from(EvalWatch))
            if int(mine or 0) > max_per_tenant:
                await session.rollback()
                raise WatchLimitError(f"Your organization has {max_per_tenant} eval watches, "
                                      "the most it may have; delete one first.")
            if int(total or 0) > max_total:
                await session.rollback()
                raise WatchLimitError(f"The platform has {max_total} eval watches, the most "
                                      "it may have; delete one first.")
            await session.commit()
        return row

    async def get(self, tenant_id: str, eval_id: str, watch_id: str) -> EvalWatch:
        async with self.db.session() as session:
            row = await session.get(EvalWatch, watch_id)
        if row is None or row.tenant_id != tenant_id or row.eval_id != eval_id:
            raise NotFoundError(f"Watch with id '{watch_id}' not found.")
        return row

    async def list_watches(self, tenant_id: str, eval_id: str) -> list[EvalWatch]:
        """Every watch of the eval (a tenant has at most a few dozen), oldest first."""
        query = (select(EvalWatch)
                 .where(EvalWatch.tenant_id == tenant_id, EvalWatch.eval_id == eval_id)
                 .order_by(EvalWatch.created_at, EvalWatch.id))
        async with self.db.session() as session:
            return list(await session.scalars(query))

    async def update(self, tenant_id: str, eval_id: str, watch_id: str,
                     changes: dict[str, Any]) -> EvalWatch:
        """Change what `UPDATABLE` names. Enabling a disabled watch makes it due at once; a
        shorter interval brings the next run nearer. An accepted run must be a completed run
        of the eval (InvalidRunError otherwise); None accepts the next completed run."""
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        watch = await self.get(tenant_id, eval_id, watch_id)
        now = utcnow()
        values: dict[str, Any] = {**changes, "updated_at": now}
        run_id = changes.get("accepted_run_id")
        if run_id is not None:
            async with self.db.session() as session:
                run = await session.get(EvalRun, run_id)
            if run is None or run.tenant_id != tenant_id or run.eval_id != eval_id:
                raise InvalidRunError(f"Run with id '{run_id}' not found in eval '{eval_id}'.")
            if run.status != "completed":
                raise InvalidRunError(f"Run {run_id} is {run.status}: only a completed run "
                                      "can be accepted.")
        if "interval_s" in changes:
            values["next_run_at"] = min(aware(watch.next_run_at),
                                        now + timedelta(seconds=changes["interval_s"]))
        if changes.get("enabled") and not watch.enabled:
            values.update(enabled_at=now, next_run_at=now)
        async with self.db.session() as session:
            await session.execute(update(EvalWatch).where(EvalWatch.id == watch_id)
                                  .values(**values))
            await session.commit()
        return await self.get(tenant_id, eval_id, watch_id)

    async def forget_tenant(self, tenant_id: str) -> int:
        """Remove every watch of a deleted tenant (before its evals and runs, which they
        name); returns how many."""
        async with self.db.session() as session:
            gone = await session.execute(delete(EvalWatch)
                                         .where(EvalWatch.tenant_id == tenant_id))
            await session.commit()
        return int(gone.rowcount)  # type: ignore[attr-defined]

    async def delete(self, tenant_id: str, eval_id: str, watch_id: str) -> None:
        await self.get(tenant_id, eval_id, watch_id)
        async with self.db.session() as session:
            await session.execute(delete(EvalWatch).where(EvalWatch.id == watch_id))
            await session.commit()

    # The scheduler's side

    async def claim_due(self, now: datetime, limit: int = 20) -> list[EvalWatch]:
        """Enabled watches due by `now`, each moved one interval on and returned only to the
        caller whose UPDATE moved it: of several schedulers looking at once, one gets it."""
        query = (select(EvalWatch)
                 .where(EvalWatch.enabled.is_(True), EvalWatch.next_run_at <= now)
                 .order_by(EvalWatch.next_run_at).limit(limit))
        claimed = []
        async with self.db.session() as session:
            for row in list(await session.scalars(query)):
                moved = await session.execute(
                    update(EvalWatch)
                    .where(EvalWatch.id == row.id, EvalWatch.enabled.is_(True),
                           EvalWatch.next_run_at == row.next_run_at)
                    .values(next_run_at=now + timedelta(seconds=row.interval_s)))
                await session.commit()
                if moved.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(row)
        return claimed

    async def enabled(self, watch_id: str) -> bool:
        async with self.db.session() as session:
            return bool(await session.scalar(select(EvalWatch.enabled)
                                             .where(EvalWatch.id == watch_id)))

    async def active_run(self, watch: EvalWatch) -> EvalRun | None:
        """The watch's latest run while it is still queued or in progress."""
        if watch.last_run_id is None:
            return None
        async with self.db.session() as session:
            run = await session.get(EvalRun, watch.last_run_id)
        return run if run is not None and run.status in ACTIVE else None

    async def started(self, watch_id: str, run_id: str) -> None:
        await self._set(watch_id, last_run_id=run_id, last_started_at=utcnow(),
                        last_error=None)

    async def skipped(self, watch_id: str, reason: str) -> None:
        await self._set(watch_id, last_skip_at=utcnow(), last_skip_reason=reason[:256],
                        skipped_runs=EvalWatch.skipped_runs + 1)

    async def not_started(self, watch_id: str, code: str | None, message: str) -> None:
        """The run could not be started (a limit, a revoked key, a deleted file...): the
        reason stays on the watch until a run starts; the watch is due again next interval."""
        await self._set(watch_id, last_error={"code": code, "message": message[:1000],
                                              "at": int(utcnow().timestamp())})

    async def _set(self, watch_id: str, **values: Any) -> None:
        async with self.db.session() as session:
            await session.execute(update(EvalWatch).where(EvalWatch.id == watch_id)
                                  .values(**values))
            await session.commit()

    async def observe(self, watch_id: str | None = None) -> int:
        """Note watches' (or one watch's) newly completed runs; the first becomes the accepted
        run of a watch that has none. Idempotent, so every gateway may run it. Returns how
        many it noted."""
        query = (select(EvalWatch.id, EvalRun.id)
                 .join(EvalRun, EvalRun.id == EvalWatch.last_run_id)
                 .where(EvalRun.status == "completed",
                        or_(EvalWatch.last_completed_run_id.is_(None),
                            EvalWatch.last_completed_run_id != EvalWatch.last_run_id)))
        if watch_id is not None:
            query = query.where(EvalWatch.id == watch_id)
        noted = 0
        async with self.db.session() as session:
            for watch_id, run_id in list(await session.execute(query)):
                done = await session.execute(
                    update(EvalWatch)
                    .where(EvalWatch.id == watch_id, EvalWatch.last_run_id == run_id)
                    .values(last_completed_run_id=run_id,
                            accepted_run_id=func.coalesce(EvalWatch.accepted_run_id, run_id)))
                noted += done.rowcount  # type: ignore[attr-defined]
            await session.commit()
        return noted

    # What the API and the metrics show

    async def views(self, watches: list[EvalWatch]) -> list[WatchView]:
        """The watches with their runs, read in one query."""
        ids = {i for w in watches
               for i in (w.last_run_id, w.last_completed_run_id, w.accepted_run_id) if i}
        runs: dict[str, EvalRun] = {}
        if ids:
            async with self.db.session() as session:
                runs = {r.id: r for r in await session.scalars(
                    select(EvalRun).where(EvalRun.id.in_(ids)))}

        def run(run_id: str | None) -> EvalRun | None:
            return runs.get(run_id) if run_id else None

        return [WatchView(w, run(w.last_run_id), run(w.last_completed_run_id),
                          run(w.accepted_run_id)) for w in watches]

    async def runs(self, watch: EvalWatch, limit: int) -> tuple[list[EvalRun], bool]:
        """The watch's newest `limit` runs, oldest first (its trend), and whether there are
        older ones. A watch's runs are the eval's runs whose metadata names it."""
        query = (select(EvalRun)
                 .where(EvalRun.eval_id == watch.eval_id,
                        EvalRun.tenant_id == watch.tenant_id,
                        EvalRun.metadata_["eval_watch_id"].as_string() == watch.id)
                 .order_by(EvalRun.created_at.desc(), EvalRun.id.desc()).limit(limit + 1))
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        return rows[:limit][::-1], len(rows) > limit

    async def enabled_views(self) -> list[WatchView]:
        """Every enabled watch (at most `max_total`), for the metrics."""
        async with self.db.session() as session:
            watches = list(await session.scalars(
                select(EvalWatch).where(EvalWatch.enabled.is_(True))
                .order_by(EvalWatch.tenant_id, EvalWatch.name)))
        return await self.views(watches)
