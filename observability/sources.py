"""Figures read from the store and from Redis for the metrics: fine-tuning jobs and vector
store files by status, and the lengths of Celery's queues. Each returns {label value: figure};
known statuses are always present (0 when none), so alerts see a zero rather than no series."""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute

from llmops.store import Database, FineTuningJob, VectorStoreFile
from observability.metrics import Reading

__all__ = [
    "FINETUNE_STATUSES",
    "VECTOR_STORE_FILE_STATUSES",
    "celery_queue_lengths",
    "finetune_jobs_by_status",
    "platform_readings",
    "vector_store_files_by_status",
]

FINETUNE_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed",
                     "cancelled")
VECTOR_STORE_FILE_STATUSES = ("in_progress", "completed", "cancelled", "failed")

# Kombu's Redis transport keeps a queue's messages of priority p (of its steps 0, 3, 6, 9) in
# the list `<queue>` for 0 and `<queue>\x06\x16<p>` otherwise, all under `global_keyprefix`.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


async def finetune_jobs_by_status(db: Database) -> dict[str, float]:
    return await _count_by_status(db, FineTuningJob.status, FINETUNE_STATUSES)


async def vector_store_files_by_status(db: Database) -> dict[str, float]:
    return await _count_by_status(db, VectorStoreFile.status, VECTOR_STORE_FILE_STATUSES)


async def _count_by_status(db: Database, column: InstrumentedAttribute[str],
                           known: Sequence[str]) -> dict[str, float]:
    out = dict.fromkeys(known, 0.0)
    async with db.session() as session:
        rows = await session.execute(select(column, func.count()).group_by(column))
        for status, count in rows:
            out[str(status)] = float(count)
    return out


async def celery_queue_lengths(redis: Redis, key_prefix: str, queues: Sequence[str]
                               ) -> dict[str, float]:
    """Messages waiting in each Celery queue (every priority), read in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for queue in queues:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(f"{key_prefix}{queue}{suffix}")
    lengths = await pipe.execute()
    step = len(_PRIORITY_SUFFIXES)
    return {queue: float(sum(lengths[i * step:(i + 1) * step]))
            for i, queue in enumerate(queues)}


def platform_readings(db: Database, redis: Redis, celery_key_prefix: str,
                      queues: Sequence[str]) -> list[Reading]:
    """The gateway's view of the rest of the platform: jobs, ingestion and Celery's queues."""
    return [
        Reading("llmops_finetune_jobs", "Fine-tuning jobs by status.", "status",
                lambda: finetune_jobs_by_status(db)),
        Reading("llmops_vector_store_files", "Files in vector stores by ingestion status.",
                "status", lambda: vector_store_files_by_status(db)),
        Reading("llmops_queue_length", "Messages waiting in each Celery queue.", "queue",
                lambda: celery_queue_lengths(redis, celery_key_prefix, queues)),
    ]
