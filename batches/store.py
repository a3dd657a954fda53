"""Batches and their requests in the SQL store (OpenAI's Batch API).

Everything a tenant asks for is scoped to it: another tenant's batch is reported as missing.
A batch is run by one worker at a time under a lease, as eval runs are: a worker claims it
with one conditional UPDATE and renews the lease with heartbeats. Each line is written when it
is sent (unique per batch and `custom_id`, and only by the lease holder) and completed with
its answer together with the batch's request counts, in one transaction. So a batch whose
worker died resumes elsewhere without sending a line twice: lines answered are skipped, and
lines sent but never answered are reported as interrupted rather than sent again.
Cancellation is a flag the worker reads at its heartbeats.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from llmops.store import Batch, BatchRequest, Database, aware, utcnow
from llmops.store.leases import stop_unfinished
from tenancy.tenants import NotFoundError

__all__ = ["ACTIVE", "TERMINAL", "Answer", "Batches", "expired", "new_batch_id"]

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("failed", "completed", "expired", "cancelled")

# The timestamp each status is entered at.
STATUS_TIMES = {"in_progress": "in_progress_at", "finalizing": "finalizing_at",
                "completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
                "cancelling": "cancelling_at", "cancelled": "cancelled_at"}


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


@dataclass(frozen=True)
class Answer:
    """What became of one line: the gateway's answer (`status_code` and `body`), or, when no
    answer came, an `error` {code, message}."""

    status_code: int | None
    body: dict[str, Any] | None
    error: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200


class Batches:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, *, tenant_id: str, key_id: str, endpoint: str, input_file_id: str,
                     completion_window: str, window: timedelta,
                     metadata: dict[str, str] | None, total: int,
                     errors: list[dict[str, Any]] | None) -> Batch:
        """A new batch: `validating` until a worker takes it, or `failed` with its `errors`
        (nothing of it runs)."""
        now = utcnow()
        row = Batch(id=new_batch_id(), tenant_id=tenant_id, key_id=key_id, endpoint=endpoint,
                    input_file_id=input_file_id, completion_window=completion_window,
                    metadata_=metadata, total=total, completed=0, failed=0,
                    cancel_requested=False, attempts=0, created_at=now,
                    expires_at=now + window, status="failed" if errors else "validating",
                    errors=errors, failed_at=now if errors else None)
        async with self.db.session() as session:
            session.add(row)
            await session.commit()
        return row

    async def discard(self, batch_id: str) -> None:
        """Remove a batch that could not be queued: nothing will run it."""
        async with self.db.session() as session:
            await session.execute(delete(Batch).where(Batch.id == batch_id))
            await session.commit()

    async def get(self, tenant_id: str, batch_id: str) -> Batch:
        """A batch of this tenant; another tenant's batch is reported as missing."""
        async with self.db.session() as session:
            row = await session.get(Batch, batch_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"No batch found with id '{batch_id}'.")
        return row

    async def batch(self, batch_id: str) -> Batch | None:
        """A batch by id alone, for its worker."""
        async with self.db.session() as session:
            return await session.get(Batch, batch_id)

    async def list_batches(self, tenant_id: str, *, limit: int = 20, after: str | None = None
                   ) -> tuple[list[Batch], bool]:
        """Newest first; `after` continues from a batch id of an earlier page."""
        query = select(Batch).where(Batch.tenant_id == tenant_id)
        if after is not None:
            cursor = await self.get(tenant_id, after)
            query = query.where((Batch.created_at < cursor.created_at)
                                | ((Batch.created_at == cursor.created_at)
                                   & (Batch.id < cursor.id)))
        query = query.order_by(Batch.created_at.desc(), Batch.id.desc())
        async with self.db.session() as session:
            rows = list(await session.scalars(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    async def forget_tenant(self, tenant_id: str) -> int:
        """Remove every batch of a deleted tenant, with its requests (a worker running one
        loses its lease and stops at its next heartbeat); returns how many. Its files go
        with the tenant's other files."""
        async with self.db.session() as session:
            ids = select(Batch.id).where(Batch.tenant_id == tenant_id).scalar_subquery()
            await session.execute(delete(BatchRequest).where(BatchRequest.batch_id.in_(ids)))
            gone = await session.execute(delete(Batch).where(Batch.tenant_id == tenant_id))
            await session.commit()
        return int(gone.rowcount)  # type: ignore[attr-defined]

    async def stop_tenant(self, tenant_id: str) -> list[str]:
        """Stop a tenant's unfinished batches (before it is deleted): those no worker holds
        are cancelled at once, so none can take them; those a worker holds are asked to stop.
        Returns the ids of those a worker still holds."""
        now = utcnow()
        mine = (Batch.tenant_id == tenant_id) & Batch.status.in_(ACTIVE)
        async with self.db.session() as session:
            held = await stop_unfinished(session, Batch, mine, status="cancelled",
                                         cancelled_at=now)
            # Those still held show that they are stopping, as a cancel request does.
            await session.execute(
                update(Batch).where(mine, Batch.status.in_(("validating", "in_progress")))
                .values(status="cancelling", cancelling_at=now))
            await session.commit()
        return held

    async def active(self, tenant_id: str) -> int:
        """Batches of the tenant that are not finished: bounded per tenant."""
        query = select(func.count()).select_from(Batch).where(
            Batch.tenant_id == tenant_id, Batch.status.in_(ACTIVE))
        async with self.db.session() as session:
            return int(await session.scalar(query) or 0)

    async def cancel(self, tenant_id: str, batch_id: str) -> tuple[Batch, bool]:
        """Ask for the batch to stop; it is `cancelling` until a worker has written what was
        done and made it `cancelled`. Returns the batch and whether a worker holds it now
        (if not, the caller queues it so that one finishes the cancellation)."""
        batch = await self.get(tenant_id, batch_id)
        now = utcnow()
        async with self.db.session() as session:
            await session.execute(
                update(Batch).where(Batch.id == batch_id,
                                    Batch.status.in_(("validating", "in_progress")))
                .values(status="cancelling", cancelling_at=now, cancel_requested=True))
            await session.commit()
        batch = await self.get(tenant_id, batch_id)
        held = batch.lease_owner is not None and batch.lease_expires_at is not None \
            and aware(batch.lease_expires_at) > now
        return batch, held

    # The lease, for workers

    async def claim(self, batch_id: str, owner: str, lease_s: float) -> Batch | None:
        """Take the batch if nobody holds it (or the holder's lease ran out); None otherwise."""
        now = utcnow()
        async with self.db.session() as session:
            claimed = await session.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.status.in_(ACTIVE),
                       Batch.lease_owner.is_(None) | (Batch.lease_expires_at < now))
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                        attempts=Batch.attempts + 1))
            await session.commit()
        return await self.batch(batch_id) if claimed.rowcount else None  # type: ignore[attr-defined]

    async def heartbeat(self, batch_id: str, owner: str, lease_s: float) -> bool:
        """Renew the lease; False when the worker should stop sending lines (cancelled, the
        lease lost, the batch deleted)."""
        async with self.db.session() as session:
            renewed = await session.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.lease_owner == owner,
                       Batch.cancel_requested.is_(False))
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
            await session.commit()
        return bool(renewed.rowcount)  # type: ignore[attr-defined]

    async def enter(self, batch_id: str, owner: str, status: str, **values: Any) -> bool:
        """Move a held batch to `status` (stamping its time); a terminal status releases the
        lease. A worker that lost the lease changes nothing."""
        now = utcnow()
        values = {"status": status, STATUS_TIMES[status]: now, **values}
        if status in TERMINAL:
            values.update(lease_owner=None, lease_expires_at=None)
        async with self.db.session() as session:
            done = await session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.lease_owner == owner)
                .values(**values))
            await session.commit()
        return bool(done.rowcount)  # type: ignore[attr-defined]

    # Lines

    async def sent(self, batch_id: str) -> set[str]:
        """The custom_ids of the lines sent already (answered or not): never sent again."""
        query = select(BatchRequest.custom_id).where(BatchRequest.batch_id == batch_id)
        async with self.db.session() as session:
            return set(await session.scalars(query))

    async def start(self, batch_id: str, owner: str, custom_id: str, line: int,
                    request_id: str) -> str | None:
        """Record that a line is about to be sent; its row's id, or None when it must not be
        sent (the lease is lost, or the line was sent before)."""
        row_id = "batch_req_" + secrets.token_hex(12)
        async with self.db.session() as session:
            # A write first: it takes the row (PostgreSQL) or the database (SQLite), so the
            # lease cannot change hands before the commit.
            held = await session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.lease_owner == owner)
                .values(attempts=Batch.attempts))
            if held.rowcount == 0:  # type: ignore[attr-defined]
                return None
            session.add(BatchRequest(id=row_id, batch_id=batch_id, custom_id=custom_id,
                                     line=line, request_id=request_id))
            try:
                await session.commit()
            except IntegrityError:
                return None
        return row_id

    async def finish(self, batch_id: str, owner: str, row_id: str, request_id: str,
                     answer: Answer) -> bool:
        """Store a line's answer and count it, in one transaction that only the lease holder
        commits; False (nothing stored) when the lease is lost or the line was settled."""
        column = Batch.completed if answer.ok else Batch.failed
        async with self.db.session() as session:
            held = await session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.lease_owner == owner)
                .values({column: column + 1}))
            if held.rowcount == 0:  # type: ignore[attr-defined]
                return False
            settled = await session.execute(
                update(BatchRequest)
                .where(BatchRequest.id == row_id, BatchRequest.finished_at.is_(None))
                .values(request_id=request_id, status_code=answer.status_code,
                        body=answer.body, error=answer.error, finished_at=utcnow()))
            if settled.rowcount == 0:  # type: ignore[attr-defined]
                await session.rollback()
                return False
            await session.commit()
        return True

    async def interrupt(self, batch_id: str, owner: str, code: str, message: str) -> int:
        """Settle the lines sent but never answered (their worker died, or they were in
        flight when the batch was cancelled or expired) as failed with `code`: they are not
        sent again, since the gateway may have served them. Returns how many."""
        async with self.db.session() as session:
            held = await session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.lease_owner == owner)
                .values(attempts=Batch.attempts))
            if held.rowcount == 0:  # type: ignore[attr-defined]
                return 0
            settled = await session.execute(
                update(BatchRequest)
                .where(BatchRequest.batch_id == batch_id, BatchRequest.finished_at.is_(None))
                .values(error={"code": code, "message": message}, finished_at=utcnow()))
            count = int(settled.rowcount)  # type: ignore[attr-defined]
            await session.execute(update(Batch).where(Batch.id == batch_id)
                                  .values(failed=Batch.failed + count))
            await session.commit()
        return count

    async def requests(self, batch_id: str, *, after_line: int = 0, limit: int = 1000
                       ) -> list[BatchRequest]:
        """A batch's settled lines in the input's order, a page at a time."""
        query = (select(BatchRequest)
                 .where(BatchRequest.batch_id == batch_id, BatchRequest.line > after_line,
                        BatchRequest.finished_at.is_not(None))
                 .order_by(BatchRequest.line).limit(limit))
        async with self.db.session() as session:
            return list(await session.scalars(query))

    async def orphaned(self, unclaimed_for: timedelta = timedelta(minutes=1)) -> list[str]:
        """Unfinished batches no worker holds, to be queued again: those whose worker stopped
        renewing its lease, and those no worker claimed within `unclaimed_for` (of their
        creation, or of a cancel that must still be written out)."""
        now = utcnow()
        since = now - unclaimed_for
        query = select(Batch.id).where(
            Batch.status.in_(ACTIVE),
            (Batch.lease_owner.is_not(None) & (Batch.lease_expires_at < now))
            | (Batch.lease_owner.is_(None) & (Batch.created_at < since)
               & (Batch.cancelling_at.is_(None) | (Batch.cancelling_at < since))))
        async with self.db.session() as session:
            return list(await session.scalars(query))


def expired(batch: Batch, now: datetime | None = None) -> bool:
    return aware(batch.expires_at) <= (now or utcnow())
