"""Flow control between tenants: while every replica of a model is full, its requests wait here,
in per-tenant queues served by weighted fair share, instead of piling onto the engines' own
queues where one tenant's flood delays everyone.

Each tenant has one queue per model, ordered by priority class (interactive, then batch, then
background) and bounded in length; tenants are served in proportion to their weights by
start-time fair queuing (each request costs 1/weight of virtual time, and a tenant that was idle
starts at the current virtual time, so idling banks no credit). A request is handed a replica,
already acquired, when one has room again (a request ended, a scrape showed a shorter engine
queue): nothing polls. A request that waited `max_wait_s`, or found its tenant's queue full, is
refused with 429 and Retry-After; one that no replica can serve at all gets 503. Each gateway
queues its own requests, so several gateways need no shared state."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from gateway.routing.policy import Decision, Router, RouteRequest
from llmops.errors import NoHealthyBackendError, RateLimitError
from llmops.settings import FlowConfig
from tenancy.priority import Priority

__all__ = ["Claim", "FairQueue", "FlowControl", "FlowObserver"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Claim:
    """Whose queue a request waits in, that tenant's weight, and the request's class."""

    tenant: str
    weight: int = 1
    priority: Priority = Priority.INTERACTIVE


class FlowObserver(Protocol):
    """Sees queues change (the gateway's metrics); cheap and never raising. `priority` is a
    class's label, `reason` one of queue_full, wait_timeout, no_capacity."""

    def queued(self, model: str, priority: str, change: int) -> None: ...

    def waited(self, model: str, priority: str, seconds: float) -> None: ...

    def shed(self, model: str, priority: str, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class _Tenant(Generic[_T]):
    weight: int = 1
    tag: float = 0.0  # virtual start time of its next request
    classes: tuple[deque[tuple[int, _T]], ...] = field(
        default_factory=lambda: tuple(deque() for _ in Priority))

    def head(self) -> tuple[int, _T] | None:
        return next((q[0] for q in self.classes if q), None)

    def __len__(self) -> int:
        return sum(len(q) for q in self.classes)


class FairQueue(Generic[_T]):
    """Items waiting, by tenant and class; `candidates` lists each waiting tenant's next item
    in the order fair share serves them, `take` serves one of them."""

    def __init__(self, max_per_tenant: int) -> None:
        self.max_per_tenant = max_per_tenant
        self._tenants: dict[str, _Tenant[_T]] = {}  # one virtual time per tenant that waited
        self._waiting: dict[str, _Tenant[_T]] = {}  # those with items, in arrival order
        self._now = 0.0  # virtual time: the start tag of the last item served
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, tenant: str, weight: int, priority: Priority, item: _T) -> bool:
        """Queue `item`; False when its tenant's queue is full."""
        queue = self._tenants.get(tenant)
        if queue is None:
            queue = self._tenants[tenant] = _Tenant()
        if len(queue) >= self.max_per_tenant:
            return False
        queue.weight = max(weight, 1)
        if tenant not in self._waiting:
            queue.tag = max(queue.tag, self._now)  # back from idle: no banked credit
            self._waiting[tenant] = queue
        queue.classes[priority].append((next(self._seq), item))
        self._size += 1
        return True

    def candidates(self) -> Iterator[tuple[str, _T]]:
        """(tenant, item): each waiting tenant's next item, the one due first first."""
        heads = []
        for tenant, queue in self._waiting.items():
            head = queue.head()
            if head is not None:
                heads.append((queue.tag, head[0], tenant, head[1]))
        heads.sort(key=lambda h: (h[0], h[1]))
        return ((tenant, item) for _, _, tenant, item in heads)

    def take(self, tenant: str, item: _T) -> None:
        """Serve `item`, a candidate: its tenant's virtual time moves on by 1/weight."""
        queue = self._waiting[tenant]
        self._now = queue.tag
        queue.tag += 1.0 / queue.weight
        self._remove(tenant, queue, item)

    def discard(self, tenant: str, item: _T) -> bool:
        """Drop `item` unserved (it left or waited too long); False if it was not queued."""
        queue = self._waiting.get(tenant)
        return queue is not None and self._remove(tenant, queue, item)

    def _remove(self, tenant: str, queue: _Tenant[_T], item: _T) -> bool:
        for cls in queue.classes:
            for entry in cls:
                if entry[1] is item:
                    cls.remove(entry)
                    self._size -= 1
                    if not len(queue):
                        del self._waiting[tenant]
                        if queue.tag <= self._now:
                            del self._tenants[tenant]  # nothing to remember: no bias
                    return True
        return False


@dataclass(eq=False, slots=True)
class _Waiter:
    route: RouteRequest
    claim: Claim
    future: asyncio.Future[Decision]
    since: float
    timer: asyncio.TimerHandle | None = None


class _Expired(Exception):
    """The request waited `max_wait_s`."""


class _Gone(Exception):
    """No replica can serve the request any more (all unhealthy or open)."""


class FlowControl:
    """The gate in front of one model's replicas (all its pools)."""

    def __init__(self, model: str, router: Router, config: FlowConfig,
                 observer: FlowObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.router = router
        self.config = config
        self.observer = observer
        self.clock = clock
        self.queue: FairQueue[_Waiter] = FairQueue(config.max_queued)
        for replica in router.replicas:
            replica.on_room = self.kick

    async def acquire(self, route: RouteRequest, claim: Claim) -> Decision:
        """A replica for the request, acquired: at once while one has room and nobody waits,
        else once its turn comes."""
        decision = self.router.decide(route)
        if decision is None:
            raise self._shed(claim, "no_capacity")
        if decision.replica.has_capacity and not len(self.queue):
            decision.replica.acquire()
            return decision
        loop = asyncio.get_running_loop()
        waiter = _Waiter(route, claim, loop.create_future(), self.clock())
        if not self.queue.push(claim.tenant, claim.weight, claim.priority, waiter):
            raise self._shed(claim, "queue_full")
        self._queued(claim, 1)
        waiter.timer = loop.call_later(self.config.max_wait_s, self._expire, waiter)
        self.kick()  # room may have come without a release (a circuit closing)
        try:
            return await waiter.future
        except _Expired:
            raise self._shed(claim, "wait_timeout") from None
        except _Gone:
            raise self._shed(claim, "no_capacity") from None
        except asyncio.CancelledError:  # the client left
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().replica.release(ok=True)  # handed over as it left: pass it on
            elif self.queue.discard(claim.tenant, waiter):
                self._left(waiter)
            raise

    def kick(self) -> None:
        """Hand replicas with room to waiting requests, in fair order, while any fits."""
        while len(self.queue):
            for tenant, waiter in self.queue.candidates():
                if waiter.future.done():  # cancelled, its task not yet resumed to leave
                    self.queue.discard(tenant, waiter)
                    self._left(waiter)
                    break
                decision = self.router.decide(waiter.route)
                if decision is not None and not decision.replica.has_capacity:
                    continue  # its replicas are full; another's may not be
                self.queue.take(tenant, waiter)
                self._left(waiter)
                if decision is None:  # nothing can serve it any more
                    waiter.future.set_exception(_Gone())
                else:
                    decision.replica.acquire()
                    waiter.future.set_result(decision)
                break
            else:
                return

    def _expire(self, waiter: _Waiter) -> None:
        if self.queue.discard(waiter.claim.tenant, waiter):
            self._left(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(_Expired())

    def _left(self, waiter: _Waiter) -> None:
        """`waiter` is out of the queue, whichever way."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        self._queued(waiter.claim, -1)
        if self.observer is not None:
            self.observer.waited(self.model, waiter.claim.priority.label,
                                 self.clock() - waiter.since)

    def _queued(self, claim: Claim, change: int) -> None:
        if self.observer is not None:
            self.observer.queued(self.model, claim.priority.label, change)

    def _shed(self, claim: Claim, reason: str) -> NoHealthyBackendError | RateLimitError:
        if self.observer is not None:
            self.observer.shed(self.model, claim.priority.label, reason)
        if reason == "no_capacity":
            return NoHealthyBackendError(
                f"No healthy backend is available for model `{self.model}`. Try again later.")
        retry = {"retry-after": str(self.config.retry_after_s)}
        if reason == "queue_full":
            return RateLimitError(
                f"Too many of your requests are waiting for model `{self.model}`: every "
                "replica is busy. Try again shortly.", headers=retry)
        return RateLimitError(
            f"Every replica of model `{self.model}` stayed busy for "
            f"{self.config.max_wait_s:g}s while your request waited. Try again shortly.",
            headers=retry)
