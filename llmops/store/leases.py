"""Work that workers hold under a lease (fine-tuning jobs, eval runs, batches): what every such
table shares when its tenant's work must stop."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from llmops.store.models import utcnow

__all__ = ["stop_unfinished"]


async def stop_unfinished(session: AsyncSession, model: Any, unfinished: ColumnElement[bool],
                          **cancelled: Any) -> list[str]:
    """Stop the `unfinished` rows of `model`: those no worker holds (no lease, or an expired
    one) take the `cancelled` values at once, so no worker can claim them; the rest are asked
    to stop. Returns the ids of those a worker still holds. The caller commits."""
    now = utcnow()
    unheld = model.lease_owner.is_(None) | (model.lease_expires_at < now)
    await session.execute(update(model).where(unfinished, unheld).values(
        **cancelled, cancel_requested=True, lease_owner=None, lease_expires_at=None))
    await session.execute(update(model).where(unfinished).values(cancel_requested=True))
    return list(await session.scalars(select(model.id).where(unfinished)))
