"""Accounting for one request: reserve its limits and budget before the model is called, then
settle them and publish exactly one usage record when it ends, however it ends.

Settling and publishing run in background tasks so that a response never waits on Redis. The
reservation is made against upper bounds of the request's tokens and of its cost on the
dearest pool it may land on, so that concurrent requests cannot overshoot a budget.
"""

from __future__ import annotations

import asyncio
import logging

from llmops.catalog import CatalogEntry
from llmops.settings import PoolConfig
from tenancy.ledger import LedgerPublisher, UsageEvent
from tenancy.limits import Admission, Limiter
from tenancy.pricing import Price, request_cost
from tenancy.tenants import Principal

__all__ = ["Accountant", "PriceBook"]

log = logging.getLogger(__name__)


class PriceBook:
    """Model prices set by admins, cached in the gateway (refreshed by a chore)."""

    def __init__(self) -> None:
        self.prices: dict[str, Price] = {}

    def price(self, entry: CatalogEntry) -> Price | None:
        return self.prices.get(entry.name) or self.prices.get(entry.base.name)


class Accountant:
    def __init__(self, limiter: Limiter, publisher: LedgerPublisher, prices: PriceBook) -> None:
        self.limiter = limiter
        self.publisher = publisher
        self.prices = prices
        self._pending: set[asyncio.Task[None]] = set()

    async def admit(self, who: Principal, entry: CatalogEntry, prompt_tokens: int,
                    completion_tokens: int) -> Admission:
        """Reserve at most this many tokens and their cost, or raise the limit's error."""
        price = self.prices.price(entry)
        # The dearest pool it may land on; none or all of its prompt cached, whichever is
        # dearer (the cost is linear in the cached tokens, so one of the two bounds it).
        cost = max(request_cost(price, pool, prompt_tokens, completion_tokens, cached)[0]
                   for pool in entry.base.pools for cached in (0, prompt_tokens))
        return await self.limiter.admit(who, prompt_tokens + completion_tokens, cost)

    def cost(self, entry: CatalogEntry | None, pool: PoolConfig | None, prompt_tokens: int,
             completion_tokens: int, cached_tokens: int = 0) -> tuple[float, float]:
        """(USD, device seconds) of a request as served."""
        price = self.prices.price(entry) if entry is not None else None
        return request_cost(price, pool, prompt_tokens, completion_tokens, cached_tokens)

    def started(self, event: UsageEvent) -> asyncio.Future[None]:
        """Publish a request's start record (`final=False`); done once it is durable."""
        future = self.publisher.submit(event)
        future.add_done_callback(_quiet)  # a failure there is the end record's to tell
        return future

    def settle(self, admission: Admission | None, event: UsageEvent) -> None:
        """Settle the reservation with what was used and publish the final record, in the
        background."""
        task = asyncio.get_running_loop().create_task(self._settle(admission, event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle(self, admission: Admission | None, event: UsageEvent) -> None:
        try:
            if admission is not None:
                await self.limiter.settle(
                    admission, event.prompt_tokens + event.completion_tokens, event.cost_usd)
        finally:
            await self.publisher.publish(event)

    async def drain(self) -> None:
        """Wait for every record still being published (shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


def _quiet(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
