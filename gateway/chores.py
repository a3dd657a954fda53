"""What the gateway does in the background while it serves: refresh prices, publish spooled
usage records (and write the ledger, where this gateway does), watch the replicas' health,
load and unload adapters, queue again the work no worker holds, start due eval watches'
runs, and collect metrics. Each loop outlives a failing round."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from celery import Celery
from redis.asyncio import Redis
from sqlalchemy import select

from batches import Batches
from evals.store import Evals
from finetune.jobs import FineTuning
from gateway.tasks import enqueue
from llmops.store import Database, ModelPrice
from observability.sources import celery_queue_lengths
from tenancy.accounting import PriceBook
from tenancy.pricing import Price
from workers.app import (
    BATCH_QUEUE,
    BATCH_TASK,
    EVAL_QUEUE,
    EVAL_TASK,
    FINETUNE_QUEUE,
    FINETUNE_TASK,
)

__all__ = ["Chores", "every", "load_prices", "requeue_orphans"]

log = logging.getLogger(__name__)

STOP_S = 5.0


async def every(period: float, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        try:
            await job()
        except Exception as exc:  # a chore must outlive a failing round
            log.warning("background chore failed: %s", exc)
        await asyncio.sleep(period)


class Chores:
    """The running loops, stopped together (bounded: see `stop`)."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[object]] = []

    def start(self, loop: Awaitable[object]) -> None:
        self.tasks.append(asyncio.ensure_future(loop))

    def every(self, period: float, job: Callable[[], Awaitable[object]]) -> None:
        self.start(every(period, job))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        # Bounded: redis-py can swallow a cancellation that lands in a blocking read (the
        # ledger writer's XREADGROUP), which hung shutdown until SIGKILL. What the writer had
        # not acknowledged stays in the stream for the next writer.
        if not self.tasks:
            return
        _, stuck = await asyncio.wait(self.tasks, timeout=STOP_S)
        for task in stuck:
            log.warning("background chore %s did not stop in %.0f s; leaving it",
                        task.get_coro(), STOP_S)


async def load_prices(db: Database, prices: PriceBook) -> None:
    async with db.session() as session:
        rows = await session.scalars(select(ModelPrice))
        prices.prices = {r.model: Price(float(r.input_per_mtok), float(r.output_per_mtok),
                                        None if r.cached_input_per_mtok is None
                                        else float(r.cached_input_per_mtok),
                                        None if r.training_per_mtok is None
                                        else float(r.training_per_mtok))
                         for r in rows}


async def requeue_orphans(jobs: FineTuning, evals: Evals, batches: Batches, celery: Celery,
                          redis: Redis, unclaimed_for: timedelta = timedelta(minutes=1)
                          ) -> None:
    """Fine-tuning jobs, eval runs and batches no worker holds go back on their queue: a worker died
    (its lease expired; a run resumes where it stopped), or the message was lost before any
    worker claimed it (a worker that died between taking and claiming it; a gateway that died
    between writing the row and sending it). They are sent while their queue is empty only:
    a message still waiting is not copied again and again. The lease lets one worker take
    each, so a copy of a message still held somewhere is harmless."""
    prefix = celery.conf.broker_transport_options.get("global_keyprefix", "")
    waiting = await celery_queue_lengths(redis, prefix, (FINETUNE_QUEUE, EVAL_QUEUE,
                                                         BATCH_QUEUE))
    lost: tuple[tuple[str, str, Callable[[timedelta], Awaitable[list[str]]]], ...] = (
        (FINETUNE_QUEUE, FINETUNE_TASK, jobs.orphaned), (EVAL_QUEUE, EVAL_TASK, evals.orphaned),
        (BATCH_QUEUE, BATCH_TASK, batches.orphaned))
    for queue, task, orphaned in lost:
        if waiting[queue]:
            continue
        for item_id in await orphaned(unclaimed_for):
            log.warning("%s %s has no worker; queueing it again", task, item_id)
            await enqueue(celery, task, [item_id])
