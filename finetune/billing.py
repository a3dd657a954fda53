"""Training is billed like inference: each attempt at a job leaves one usage record under the
job's tenant and key (endpoint `/v1/fine_tuning/jobs`, request id `<job id>:<attempt>`) with
the tokens it trained on, the device seconds it held and their cost, and adds that cost to the
budgets.

The record is rewritten as the attempt goes on (at each checkpoint and at its end), so an
attempt whose worker is killed is billed up to its last checkpoint; the next attempt resumes
from that checkpoint and bills only what it trains itself, under its own request id. Nothing
is billed twice, and budgets are charged only the growth of each record.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from sqlalchemy import select

from finetune.dataset import Example
from llmops.store import Database, FineTuningJob, ModelPrice
from observability.worker_metrics import METRICS
from tenancy.ledger import UsageEvent, record_usage
from tenancy.pricing import Price, training_cost

__all__ = ["ENDPOINT", "AttemptBill", "estimate_cost", "training_price"]

ENDPOINT = "/v1/fine_tuning/jobs"
Charge = Callable[[str, str, float], Awaitable[None]]  # (tenant, key, cost): budget counters


async def training_price(db: Database, model: str) -> Price | None:
    """The model's admin-set price, with its training price if it has one."""
    async with db.session() as session:
        row = await session.scalar(select(ModelPrice).where(ModelPrice.model == model))
    if row is None:
        return None
    return Price(float(row.input_per_mtok), float(row.output_per_mtok),
                 None if row.cached_input_per_mtok is None else float(row.cached_input_per_mtok),
                 None if row.training_per_mtok is None else float(row.training_per_mtok))


def estimate_cost(examples: list[Example], n_epochs: int, price: Price | None,
                  device_cost_per_hour_usd: float, tokens_per_s: float) -> tuple[int, float]:
    """(tokens, USD) a job will train on: its examples' tokens times its epochs, priced like
    the job itself (device time estimated from the workers' measured throughput)."""
    tokens = sum(e.n_tokens for e in examples) * n_epochs
    return tokens, training_cost(price, device_cost_per_hour_usd, tokens, tokens / tokens_per_s)


class AttemptBill:
    """The usage record of one attempt at a job, grown with `update` as training goes on."""

    def __init__(self, db: Database, job: FineTuningJob, price: Price | None,
                 device_cost_per_hour_usd: float, charge: Charge, *, devices: int = 1) -> None:
        self.db, self.job, self.price, self.devices = db, job, price, devices
        self.cost_per_hour = device_cost_per_hour_usd
        self.charge = charge
        self.started = time.monotonic()
        self.created_at = time.time()
        self.billed = 0.0

    async def update(self, trained_tokens: int, *, ended: bool = False) -> None:
        """Record what this attempt trained so far (status 0 until its training ended: a
        killed worker's attempt keeps 0, as a request cut off by a dying gateway does)."""
        status = 200 if ended else 0
        wall = time.monotonic() - self.started
        seconds = wall * self.devices  # every device of the group is held the whole time
        cost = training_cost(self.price, self.cost_per_hour, trained_tokens, seconds)
        job = self.job
        await record_usage(self.db, UsageEvent(
            request_id=f"{job.id}:{job.attempts}", tenant_id=job.tenant_id, key_id=job.key_id,
            endpoint=ENDPOINT, model=job.model, status=status, trained_tokens=trained_tokens,
            latency_ms=wall * 1000, device_seconds=seconds, cost_usd=cost,
            created_at=self.created_at))
        if cost > self.billed:
            await self.charge(job.tenant_id, job.key_id, cost - self.billed)
            METRICS.train_cost.labels(job.model).inc(cost - self.billed)
            self.billed = cost
