"""Flow control: the fair queue's order (weights, classes, idle tenants), and the gate in front
of a model's replicas (room handed over on release, bounds, clients that leave)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from gateway.routing import Circuit, Pool, Replica, Router, build_scorers
from gateway.routing.flow import Claim, FairQueue, FlowControl
from gateway.routing.policy import RouteRequest
from llmops.errors import NoHealthyBackendError, RateLimitError
from llmops.settings import FlowConfig, RoutingConfig
from tenancy.priority import Priority

BATCH, BACKGROUND, INTERACTIVE = Priority.BATCH, Priority.BACKGROUND, Priority.INTERACTIVE


def drain(queue: FairQueue[str], n: int | None = None) -> list[str]:
    served = []
    while len(queue) and (n is None or len(served) < n):
        tenant, item = next(queue.candidates())
        queue.take(tenant, item)
        served.append(item)
    return served


def test_backlogged_tenants_are_served_in_proportion_to_their_weights() -> None:
    queue: FairQueue[str] = FairQueue(max_per_tenant=1000)
    for i in range(300):
        queue.push("a", 1, INTERACTIVE, f"a{i}")
        queue.push("b", 3, INTERACTIVE, f"b{i}")
        queue.push("c", 2, INTERACTIVE, f"c{i}")
    served = Counter(item[0] for item in drain(queue, 120))
    assert served == {"a": 20, "b": 60, "c": 40}


def test_a_flood_does_not_delay_a_quiet_tenant() -> None:
    queue: FairQueue[str] = FairQueue(max_per_tenant=1000)
    for i in range(100):
        queue.push("noisy", 1, INTERACTIVE, f"noisy{i}")
    drain(queue, 10)
    queue.push("quiet", 1, INTERACTIVE, "quiet0")
    # The quiet tenant starts at the current virtual time: next or the one after, not 91st.
    assert "quiet0" in drain(queue, 2)


def test_an_idle_tenant_banks_no_credit() -> None:
    queue: FairQueue[str] = FairQueue(max_per_tenant=1000)
    for i in range(50):
        queue.push("a", 1, INTERACTIVE, f"a{i}")
    drain(queue, 40)  # b was idle all along: it may not now take 40 turns in a row
    for i in range(10):
        queue.push("b", 1, INTERACTIVE, f"b{i}")
    assert Counter(item[0] for item in drain(queue, 10)) == {"a": 5, "b": 5}


def test_within_a_tenant_interactive_comes_first_then_batch_then_background() -> None:
    queue: FairQueue[str] = FairQueue(max_per_tenant=10)
    queue.push("a", 1, BACKGROUND, "eval")
    queue.push("a", 1, BATCH, "line")
    queue.push("a", 1, INTERACTIVE, "chat")
    queue.push("a", 1, BATCH, "line2")
    assert drain(queue) == ["chat", "line", "line2", "eval"]


def test_a_tenant_queue_is_bounded_and_discarded_items_leave_it() -> None:
    queue: FairQueue[str] = FairQueue(max_per_tenant=2)
    assert queue.push("a", 1, INTERACTIVE, "a0") and queue.push("a", 1, BATCH, "a1")
    assert not queue.push("a", 1, INTERACTIVE, "a2")
    assert queue.push("b", 1, INTERACTIVE, "b0")  # other tenants have their own bound
    assert queue.discard("a", "a0") and not queue.discard("a", "a0")
    assert queue.push("a", 1, INTERACTIVE, "a2")
    assert sorted(drain(queue)) == ["a1", "a2", "b0"] and len(queue) == 0


# The gate, on real routers and replicas.

class Observer:
    def __init__(self) -> None:
        self.depth: Counter[tuple[str, str]] = Counter()
        self.shed_reasons: list[str] = []
        self.waits = 0

    def queued(self, model: str, priority: str, change: int) -> None:
        self.depth[model, priority] += change

    def waited(self, model: str, priority: str, seconds: float) -> None:
        assert seconds >= 0
        self.waits += 1

    def shed(self, model: str, priority: str, reason: str) -> None:
        self.shed_reasons.append(reason)


def gate(replicas: int = 1, max_concurrency: int = 1, **config: Any
         ) -> tuple[FlowControl, list[Replica], Observer]:
    pool = [Replica(f"r{i}", "cpu", max_concurrency=max_concurrency, max_waiting=4,
                    circuit=Circuit(threshold=2, cooldown_s=10)) for i in range(replicas)]
    router = Router([Pool("cpu", 0, pool)], build_scorers(RoutingConfig()),
                    rng=random.Random(0))
    observer = Observer()
    return FlowControl("chat", router, FlowConfig(**config), observer), pool, observer


ANY = RouteRequest()


async def queued(flow: FlowControl, n: int) -> None:
    """Until `n` requests wait (the tasks that make them run up to their queue)."""
    for _ in range(100):
        if len(flow.queue) == n:
            return
        await asyncio.sleep(0)  # a turn of the event loop, not a wait for time to pass
    raise AssertionError(f"{len(flow.queue)} requests queued, not {n}")


async def test_room_goes_to_a_request_at_once_and_is_handed_over_on_release() -> None:
    flow, (r,), observer = gate()
    assert (await flow.acquire(ANY, Claim("a"))).replica is r and r.outstanding == 1
    waiting = asyncio.create_task(flow.acquire(ANY, Claim("a")))
    await queued(flow, 1)
    assert not waiting.done() and observer.depth["chat", "interactive"] == 1
    r.release(ok=True)
    assert (await waiting).replica is r and r.outstanding == 1  # acquired for it, not taken
    assert observer.depth["chat", "interactive"] == 0 and observer.waits == 1


async def test_released_room_is_shared_by_weight() -> None:
    flow, (r,), _ = gate()
    await flow.acquire(ANY, Claim("a"))  # the replica is full
    served: list[str] = []

    async def one(tenant: str, weight: int) -> None:
        decision = await flow.acquire(ANY, Claim(tenant, weight))
        served.append(tenant)
        decision.replica.release(ok=True)

    # a floods first; b, three times a's weight, comes after.
    tasks = [asyncio.create_task(one("a", 1)) for _ in range(12)]
    await queued(flow, 12)
    tasks += [asyncio.create_task(one("b", 3)) for _ in range(12)]
    await queued(flow, 24)
    r.release(ok=True)
    await asyncio.gather(*tasks)
    assert Counter(served[:8]) == {"a": 2, "b": 6}


async def test_a_full_tenant_queue_is_refused_with_retry_after() -> None:
    flow, (r,), observer = gate(max_queued=2, retry_after_s=3)
    await flow.acquire(ANY, Claim("a"))
    waiting = [asyncio.create_task(flow.acquire(ANY, Claim("a"))) for _ in range(2)]
    await queued(flow, 2)
    with pytest.raises(RateLimitError) as refused:
        await flow.acquire(ANY, Claim("a"))
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers == {"retry-after": "3"}
    other = asyncio.create_task(flow.acquire(ANY, Claim("b")))  # b's queue is its own
    await queued(flow, 3)
    assert not other.done() and observer.shed_reasons == ["queue_full"]
    for task in [*waiting, other]:
        task.cancel()
    await asyncio.gather(*waiting, other, return_exceptions=True)
    assert len(flow.queue) == 0 and r.outstanding == 1


async def test_a_request_that_waits_too_long_is_refused_and_leaves_the_queue() -> None:
    flow, (r,), observer = gate(max_wait_s=0.01)
    await flow.acquire(ANY, Claim("a"))
    with pytest.raises(RateLimitError, match="stayed busy") as refused:
        await flow.acquire(ANY, Claim("a", priority=BATCH))
    assert refused.value.headers is not None and "retry-after" in refused.value.headers
    assert observer.shed_reasons == ["wait_timeout"] and len(flow.queue) == 0
    assert observer.depth["chat", "batch"] == 0
    r.release(ok=True)
    assert r.outstanding == 0  # nobody was handed the room


async def test_a_client_that_leaves_while_queued_leaves_the_queue() -> None:
    flow, (r,), observer = gate()
    await flow.acquire(ANY, Claim("a"))
    leaving = asyncio.create_task(flow.acquire(ANY, Claim("a")))
    staying = asyncio.create_task(flow.acquire(ANY, Claim("b")))
    await queued(flow, 2)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert len(flow.queue) == 1 and observer.depth["chat", "interactive"] == 1
    r.release(ok=True)
    assert (await staying).replica is r and r.outstanding == 1


async def test_room_skips_a_request_cancelled_before_it_could_leave() -> None:
    flow, (r,), observer = gate()
    await flow.acquire(ANY, Claim("a"))
    leaving = asyncio.create_task(flow.acquire(ANY, Claim("a")))
    staying = asyncio.create_task(flow.acquire(ANY, Claim("b")))
    await queued(flow, 2)
    leaving.cancel()
    r.release(ok=True)  # before `leaving` ran again: its turn goes to the next in line
    assert (await staying).replica is r
    await asyncio.gather(leaving, return_exceptions=True)
    assert len(flow.queue) == 0 and r.outstanding == 1
    assert observer.depth["chat", "interactive"] == 0


async def test_room_handed_to_a_client_as_it_leaves_is_passed_on() -> None:
    flow, (r,), _ = gate()
    await flow.acquire(ANY, Claim("a"))
    leaving = asyncio.create_task(flow.acquire(ANY, Claim("a")))
    await queued(flow, 1)
    r.release(ok=True)  # hands the replica to `leaving`, which is cancelled before it runs
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert r.outstanding == 0 and len(flow.queue) == 0


async def test_no_replica_at_all_is_503_and_queued_requests_learn_it() -> None:
    flow, (r,), observer = gate()
    await flow.acquire(ANY, Claim("a"))
    waiting = asyncio.create_task(flow.acquire(ANY, Claim("a")))
    await queued(flow, 1)
    r.healthy = False
    r.release(ok=False)
    with pytest.raises(NoHealthyBackendError):
        await waiting
    with pytest.raises(NoHealthyBackendError):
        await flow.acquire(ANY, Claim("b"))
    assert observer.shed_reasons == ["no_capacity", "no_capacity"]


async def test_any_replica_with_room_serves_the_queue() -> None:
    flow, replicas, _ = gate(replicas=2)
    first = [(await flow.acquire(ANY, Claim("a"))).replica for _ in range(2)]
    assert set(map(id, first)) == set(map(id, replicas))
    waiting = asyncio.create_task(flow.acquire(ANY, Claim("a")))
    await queued(flow, 1)
    replicas[1].release(ok=True)
    assert (await waiting).replica is replicas[1]
