"""Background upkeep of replica state: active `/health` probes, scraping vLLM's `/metrics`
for queue length and KV-cache use, and discovering loaded LoRA adapters from `/v1/models`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import aiohttp
import orjson

from gateway.routing.policy import Router
from gateway.routing.replica import Replica
from llmops.catalog import Catalog
from llmops.settings import RoutingConfig

__all__ = ["EngineLoad", "HealthMonitor", "parse_vllm_metrics"]

log = logging.getLogger(__name__)


class EngineLoad(NamedTuple):
    waiting: float
    kv_cache_usage: float  # 0..1
    running: float


def parse_vllm_metrics(text: str) -> EngineLoad:
    """Requests waiting and running, and KV-cache usage, from vLLM's Prometheus text; several
    engines or label sets add up for the queues, and the fullest cache counts."""
    waiting = running = kv = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name == "vllm:num_requests_waiting":
            waiting += float(line.rsplit(" ", 1)[1])
        elif name == "vllm:num_requests_running":
            running += float(line.rsplit(" ", 1)[1])
        elif name == "vllm:kv_cache_usage_perc":
            kv = max(kv, float(line.rsplit(" ", 1)[1]))
    return EngineLoad(waiting, kv, running)


class HealthMonitor:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        routers: dict[str, Router],
        catalog: Catalog,
        config: RoutingConfig,
    ) -> None:
        self.session = session
        self.routers = routers
        self.catalog = catalog
        self.config = config
        self._tasks: list[asyncio.Task[None]] = []
        self._timeout = aiohttp.ClientTimeout(total=config.health_timeout_s)

    @property
    def replicas(self) -> list[Replica]:
        seen: dict[int, Replica] = {}
        for router in self.routers.values():
            for r in router.replicas:
                seen.setdefault(id(r), r)
        return list(seen.values())

    async def start(self) -> None:
        await self.refresh()  # serve with real health from the first request on
        jobs: Sequence[tuple[float, Callable[[], Awaitable[None]]]] = (
            (self.config.health_interval_s, self.probe_all),
            (self.config.metrics_interval_s, self.scrape_all),
            (self.config.models_interval_s, self.discover_adapters),
        )
        self._tasks = [asyncio.create_task(self._every(p, job)) for p, job in jobs]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def refresh(self) -> None:
        await self.probe_all()
        await asyncio.gather(self.scrape_all(), self.discover_adapters())

    async def _every(self, period: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await job()
            except Exception:  # keep the loop alive whatever one round hits
                log.exception("health monitor round failed")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self.replicas))

    async def probe(self, replica: Replica) -> None:
        try:
            async with self.session.get(f"{replica.url}/health", timeout=self._timeout) as resp:
                ok = resp.status == 200
        except aiohttp.ClientConnectorError:
            replica.probe_failures = self.config.failure_threshold  # nothing listens: gone
            ok = False
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            back = not replica.healthy
            replica.healthy, replica.probe_failures = True, 0
            if back:
                log.info("replica %s is healthy again", replica.url)
                if replica.on_room is not None:
                    replica.on_room()
        else:
            replica.probe_failures += 1
            if replica.probe_failures >= self.config.failure_threshold and replica.healthy:
                log.warning("replica %s failed its health probe", replica.url)
                replica.healthy = False

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(r) for r in self.replicas if r.healthy))

    async def scrape(self, replica: Replica) -> None:
        try:
            async with self.session.get(f"{replica.url}/metrics", timeout=self._timeout) as resp:
                if resp.status != 200:
                    return
                load = parse_vllm_metrics(await resp.text())
                replica.waiting, replica.kv_cache_usage = load.waiting, load.kv_cache_usage
                replica.running = load.running
            if replica.on_room is not None and replica.has_capacity:
                replica.on_room()  # its engine's queue may have shortened
        except (aiohttp.ClientError, TimeoutError, ValueError, IndexError):
            pass  # stale load figures are better than none; health is judged elsewhere

    async def discover_adapters(self) -> None:
        for base in self.catalog.bases:
            if base.kind != "chat":
                continue
            replicas = [r for r in self.routers[base.name].replicas if r.healthy]
            before = [r.adapters for r in replicas]
            found = await asyncio.gather(*(self._adapters_of(r, base.upstream_name)
                                           for r in replicas))
            names: set[str] = set()
            for replica, seen, adapters in zip(replicas, before, found, strict=True):
                if adapters is not None:
                    # An adapter loaded while the listing was on its way is not in it: keep it.
                    replica.adapters = adapters | (replica.adapters - seen)
                names |= replica.adapters
            self.catalog.set_adapters(base.name, sorted(names))

    async def _adapters_of(self, replica: Replica, parent: str) -> frozenset[str] | None:
        try:
            async with self.session.get(f"{replica.url}/v1/models", timeout=self._timeout) as r:
                if r.status != 200:
                    return None
                data = orjson.loads(await r.read())["data"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            return None
        return frozenset(
            m["id"] for m in data if m.get("parent") == parent and m.get("id") != parent
        )
