"""Fine-tuning jobs in the SQL store: creation, listing, events, checkpoints, cancellation,
and the lease that keeps a job on one worker at a time.

A worker claims a job with one conditional UPDATE (free, or its lease expired) and renews the
lease with heartbeats while it trains. If the worker dies, the lease runs out and the job can
be claimed again; the next worker resumes from the job's newest checkpoint. Cancellation is a
flag the training loop reads at its heartbeats, so it stops within a few steps.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from llmops.catalog import FINE_TUNED
from llmops.store import (
    Database,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
    utcnow,
)
from llmops.store.leases import stop_unfinished
from tenancy.tenants import NotFoundError

__all__ = ["ACTIVE", "TERMINAL", "FineTuning", "adapter_name"]

ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


def adapter_name(job: FineTuningJob) -> str:
    """The served name of a job's adapter; the job id keeps every version's name unique
    (vLLM reuses stale prefix-cache blocks when a name is reloaded, vllm#42125)."""
    return f"{FINE_TUNED}{job.model}:{job.suffix or 'custom'}:{job.id}"


class FineTuning:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, **fields: Any) -> FineTuningJob:
        job = FineTuningJob(id="ftjob-" + secrets.token_hex(12), **fields)
        async with self.db.session() as session:
            session.add(job)
            await session.commit()
        return job

    async def get(self, job_id: str, tenant_id: str | None = None) -> FineTuningJob:
        """A job; with `tenant_id`, another tenant's job is reported as missing."""
        async with self.db.session() as session:
            job = await session.get(FineTuningJob, job_id)
        if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
            raise NotFoundError(f"Fine-tuning job {job_id} not found.")
        return job

    async def list_jobs(self, tenant_id: str, *, limit: int = 20, after: str | None = None
                   ) -> tuple[list[FineTuningJob], bool]:
        query = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
        if after is not None:
            cursor = await self.get(after, tenant_id)
            query = query.where(FineTuningJob.created_at < cursor.created_at)
        query = query.order_by(FineTuningJob.created_at.desc()).limit(limit + 1)
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        return rows[:limit], len(rows) > limit

    async def discard(self, job_id: str) -> None:
        """Delete a job no worker has taken, and its events: one that could not be queued."""
        untaken = (FineTuningJob.id == job_id, FineTuningJob.lease_owner.is_(None))
        async with self.db.session() as session:
            await session.execute(delete(FineTuningEvent).where(FineTuningEvent.job_id.in_(
                select(FineTuningJob.id).where(*untaken).scalar_subquery())))
            await session.execute(delete(FineTuningJob).where(*untaken))
            await session.commit()

    async def cancel(self, job_id: str, tenant_id: str) -> FineTuningJob:
        """Cancel at once when no worker holds the job, else ask its worker to stop."""
        job = await self.get(job_id, tenant_id)
        if job.status in TERMINAL:
            return job
        now = utcnow()
        async with self.db.session() as session:
            unheld = await session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id, FineTuningJob.status.in_(ACTIVE),
                       (FineTuningJob.lease_owner.is_(None))
                       | (FineTuningJob.lease_expires_at < now))
                .values(status="cancelled", finished_at=now, cancel_requested=True))
            if unheld.rowcount == 0:  # type: ignore[attr-defined]
                await session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                                      .values(cancel_requested=True))
            await session.commit()
        if unheld.rowcount:  # type: ignore[attr-defined]
            await self.event(job_id, "The job was cancelled.")
        return await self.get(job_id)

    async def stop_tenant(self, tenant_id: str) -> list[str]:
        """Stop a tenant's unfinished jobs (before it is deleted): those no worker holds are
        cancelled at once, so none can take them; those a worker holds are asked to stop.
        Returns the ids of those a worker still holds."""
        mine = (FineTuningJob.tenant_id == tenant_id) & FineTuningJob.status.in_(ACTIVE)
        async with self.db.session() as session:
            held = await stop_unfinished(session, FineTuningJob, mine, status="cancelled",
                                         finished_at=utcnow())
            await session.commit()
        return held

    async def forget_tenant(self, tenant_id: str, adapters_root: Path) -> int:
        """Remove every job of a deleted tenant with its events and checkpoints, and its
        folder under `adapters_root` (training state and the published adapter; gateways
        unload an adapter whose job is gone when they next reconcile). Folders go before
        rows, so that a purge interrupted in between finds them again. Returns how many."""
        query = select(FineTuningJob.id).where(FineTuningJob.tenant_id == tenant_id)
        async with self.db.session() as session:
            ids = list(await session.scalars(query))
        for job_id in ids:
            await asyncio.to_thread(shutil.rmtree, adapters_root / job_id, ignore_errors=True)
        async with self.db.session() as session:
            await session.execute(delete(FineTuningEvent).where(
                FineTuningEvent.job_id.in_(query.scalar_subquery())))
            await session.execute(delete(FineTuningCheckpoint).where(
                FineTuningCheckpoint.job_id.in_(query.scalar_subquery())))
            await session.execute(delete(FineTuningJob).where(
                FineTuningJob.tenant_id == tenant_id))
            await session.commit()
        return len(ids)

    async def event(self, job_id: str, message: str, *, level: str = "info",
                    type_: str = "message", data: dict[str, Any] | None = None) -> None:
        async with self.db.session() as session:
            session.add(FineTuningEvent(job_id=job_id, message=message[:1000], level=level,
                                        type=type_, data=data))
            await session.commit()

    async def events(self, job_id: str, tenant_id: str, *, limit: int = 20,
                     after: int | None = None) -> tuple[list[FineTuningEvent], bool]:
        """Newest first, as OpenAI lists them."""
        await self.get(job_id, tenant_id)
        query = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id)
        if after is not None:
            query = query.where(FineTuningEvent.id < after)
        query = query.order_by(FineTuningEvent.id.desc()).limit(limit + 1)
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        return rows[:limit], len(rows) > limit

    async def checkpoint(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        async with self.db.session() as session:
            session.add(FineTuningCheckpoint(id="ftckpt-" + secrets.token_hex(12),
                                             job_id=job_id, step=step, metrics=metrics))
            await session.commit()

    async def checkpoints(self, job_id: str, tenant_id: str) -> list[FineTuningCheckpoint]:
        await self.get(job_id, tenant_id)
        query = (select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
                 .order_by(FineTuningCheckpoint.step.desc()))
        async with self.db.session() as session:
            return list(await session.scalars(query))

    # The lease

    async def claim(self, job_id: str, owner: str, lease_s: float) -> FineTuningJob | None:
        """Take the job if nobody holds it (or the holder's lease ran out); None otherwise."""
        now = utcnow()
        async with self.db.session() as session:
            claimed = await session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id, FineTuningJob.status.in_(ACTIVE),
                       FineTuningJob.cancel_requested.is_(False),
                       (FineTuningJob.lease_owner.is_(None))
                       | (FineTuningJob.lease_expires_at < now))
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                        attempts=FineTuningJob.attempts + 1))
            await session.commit()
        return await self.get(job_id) if claimed.rowcount else None  # type: ignore[attr-defined]

    async def heartbeat(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Renew the lease; False when the job should stop (cancelled, or the lease lost)."""
        async with self.db.session() as session:
            renewed = await session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id, FineTuningJob.lease_owner == owner,
                       FineTuningJob.cancel_requested.is_(False))
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
            await session.commit()
        return bool(renewed.rowcount)  # type: ignore[attr-defined]

    async def update(self, job_id: str, owner: str, **values: Any) -> bool:
        """Change a held job (status, results); a worker that lost the lease changes nothing."""
        if values.get("status") in TERMINAL:
            values.update(finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
        async with self.db.session() as session:
            done = await session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id, FineTuningJob.lease_owner == owner)
                .values(**values))
            await session.commit()
        return bool(done.rowcount)  # type: ignore[attr-defined]

    async def with_adapters(self) -> list[FineTuningJob]:
        """Jobs that produced an adapter: succeeded, or running with one under evaluation
        (`fine_tuned_model` is set when training ends)."""
        query = select(FineTuningJob).where(
            FineTuningJob.fine_tuned_model.is_not(None),
            FineTuningJob.status.in_(("succeeded", "running")))
        async with self.db.session() as session:
            return list(await session.scalars(query))

    async def orphaned(self, unclaimed_for: timedelta = timedelta(minutes=1)) -> list[str]:
        """Active jobs no worker holds, to be queued again: those whose worker stopped renewing
        its lease, and those no worker claimed within `unclaimed_for` of their creation."""
        now = utcnow()
        query = select(FineTuningJob.id).where(
            FineTuningJob.status.in_(ACTIVE),
            (FineTuningJob.lease_owner.is_not(None) & (FineTuningJob.lease_expires_at < now))
            | (FineTuningJob.lease_owner.is_(None)
               & (FineTuningJob.created_at < now - unclaimed_for)))
        async with self.db.session() as session:
            return list(await session.scalars(query))
