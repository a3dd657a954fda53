"""The gateway's Prometheus metrics, in a registry of their own (so that several apps in one
process, and tests, never collide).

Three kinds of figures:
- per request, recorded as requests end (`GatewayMetrics` is the accountant's
  `RequestObserver`): requests, latencies, tokens, cost, in-flight requests, rejections,
  upstream retries, fallbacks to a lower-priority pool and guardrail events;
- the routers' live view of the backends (health, circuit state), read at scrape time;
- figures from the store and Redis (fine-tuning jobs, vector store files, Celery queues, eval
  watches' pass rates), read by a background task every `refresh_s` with a timeout, so that
  a scrape only reads cached values and a storm of scrapes cannot hammer the database. A
  failed read drops that family until the next good one and counts in
  `llmops_metrics_collect_errors_total`.

Label values are bounded: models are catalog names (`unknown` for a name that did not
resolve), pools are `primary` (the model's highest priority) or `fallback<n>` (the n-th lower
priority), and tenants go through `TenantLabels`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from llmops.settings import MetricsConfig, ModelConfig, PoolConfig
from observability.server import authorized
from observability.tenants import TenantLabels
from tenancy.ledger import UsageEvent


class Replica(Protocol):
    """What metrics read of a replica, as the gateway's routers keep it."""

    @property
    def url(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def config(self) -> PoolConfig | None: ...
    @property
    def circuit(self) -> Any: ...  # its `state` is an Enum member


class Router(Protocol):
    @property
    def replicas(self) -> Sequence[Replica]: ...

__all__ = [
    "CONTENT_TYPE",
    "E2E_BUCKETS",
    "TPOT_BUCKETS",
    "TTFT_BUCKETS",
    "GatewayMetrics",
    "Reading",
    "Refreshed",
]

log = logging.getLogger(__name__)

# From a cached 5 ms answer to a 10-minute generation on a CPU engine.
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
               60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 60.0, 120.0)
# A GPU decodes a token in milliseconds, a CPU engine in tens to hundreds of them.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 1.0, 2.5)

# The classic text format: every name and label here is a legacy (underscore) one, which any
# Prometheus reads; prometheus_client's CONTENT_TYPE_LATEST names version 1.0.0 now.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NONE = "none"
UNKNOWN = "unknown"
_STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")  # by status // 100
_READ_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Reading:
    """A gauge family read from outside the process, one label, refreshed in the background."""

    name: str
    documentation: str
    label: str
    read: Callable[[], Awaitable[Mapping[str, float]]]


class Refreshed(Protocol):
    """A collector of families with several labels, read in the background like the readings
    (`GatewayMetrics.add_collector`); scrapes see its figures of the last good `refresh()`."""

    async def refresh(self) -> None: ...

    def clear(self) -> None:
        """Drop the figures (after a failed refresh): better no series than stale ones."""

    def describe(self) -> list[Metric]: ...

    def collect(self) -> list[Metric]: ...


@dataclass(frozen=True, slots=True)
class _Pool:
    name: str  # primary | fallback<n>
    fallback_from: str | None  # the best pool's device, when this pool is a fallback


class _Series:
    """The children of every per-request family for one combination of label values, looked up
    once per request instead of one `labels()` call per family."""

    __slots__ = ("completion", "cost", "prompt", "requests", "timings")

    def __init__(self, m: GatewayMetrics, model: str, pool: str, device: str, status: str,
                 tenant: str, endpoint: str) -> None:
        self.requests = m.requests.labels(model, pool, device, status, tenant, endpoint)
        # Latencies only for requests that reached a backend: no empty histograms otherwise.
        self.timings = None if pool == NONE else (
            m.duration.labels(model, device), m.ttft.labels(model, device),
            m.tpot.labels(model, device))
        self.prompt = m.tokens.labels(model, tenant, "prompt")
        self.completion = m.tokens.labels(model, tenant, "completion")
        self.cost = m.cost.labels(model, tenant)


def _pool_labels(models: Sequence[ModelConfig]) -> dict[int, _Pool]:
    """Labels of every configured pool, by the identity of its config (replicas and catalog
    entries hold those same objects)."""
    out: dict[int, _Pool] = {}
    for model in models:
        levels = sorted({p.priority for p in model.pools}, reverse=True)
        best = max(model.pools, key=lambda p: p.priority)
        for pool in model.pools:
            level = levels.index(pool.priority)
            out[id(pool)] = _Pool("primary" if level == 0 else f"fallback{level}",
                                  best.device if level else None)
    return out


class GatewayMetrics:
    def __init__(self, config: MetricsConfig, models: Sequence[ModelConfig],
                 routers: Mapping[str, Router]) -> None:
        self.config = config
        self.registry = r = CollectorRegistry()
        self.tenants = TenantLabels(config.top_tenants, config.tenants)
        self.requests = Counter(
            "llmops_requests", "Requests that ended, by how.",
            ["model", "pool", "device", "status_class", "tenant", "endpoint"], registry=r)
        self.duration = Histogram(
            "llmops_request_duration_seconds",
            "End-to-end latency of requests sent to a backend (streams: until the last byte).",
            ["model", "device"], buckets=E2E_BUCKETS, registry=r)
        self.ttft = Histogram(
            "llmops_time_to_first_token_seconds", "Time to the first token of streams.",
            ["model", "device"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "llmops_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per stream.",
            ["model", "device"], buckets=TPOT_BUCKETS, registry=r)
        self.tokens = Counter(
            "llmops_tokens", "Tokens processed, as the engines counted them.",
            ["model", "tenant", "kind"], registry=r)
        self.cost = Counter("llmops_cost_usd", "Cost of requests in US dollars.",
                            ["model", "tenant"], registry=r)
        self.in_flight = Gauge("llmops_requests_in_flight",
                               "Admitted requests not finished yet.", ["model"], registry=r)
        self.rejections = Counter("llmops_rejections", "Requests refused by limits or budgets.",
                                  ["reason", "tenant"], registry=r)
        self.retries = Counter(
            "llmops_upstream_retries", "Requests sent to another replica after one failed.",
            ["model"], registry=r)
        self.routing = Counter(
            "llmops_routing_decisions", "Requests sent to a replica, by why routing chose it "
            "(prefix, session, load, adapter, fallback).", ["model", "pool", "reason"],
            registry=r)
        self.fallbacks = Counter(
            "llmops_fallbacks", "Requests served by a lower-priority pool than the model's "
            "best one.", ["model", "from_device", "to_device"], registry=r)
        self.guardrail_events = Counter(
            "llmops_guardrail_events", "Guardrail actions on requests: one per request, stage, "
            "category and action (block, redact, log, drop).",
            ["stage", "category", "action", "tenant"], registry=r)
        self.collect_errors = Counter(
            "llmops_metrics_collect_errors", "Failed background reads of a metric family.",
            ["family"], registry=r)
        ProcessCollector(registry=r)
        self._pools = _pool_labels(models)
        r.register(_Backends(routers, self._pools))
        self._readings = _Readings()
        r.register(self._readings)
        self._collectors: list[tuple[str, Refreshed]] = []
        self._series: dict[tuple[str, str, str, str, str, str], _Series] = {}
        self._in_flight: dict[str, Gauge] = {}
        self._task: asyncio.Task[None] | None = None

    # The accountant's RequestObserver: called on the request path, so cheap and never raising.

    def admitted(self, model: str) -> None:
        gauge = self._in_flight.get(model)
        if gauge is None:
            gauge = self._in_flight[model] = self.in_flight.labels(model)
        gauge.inc()

    def rejected(self, reason: str, tenant_id: str) -> None:
        self.rejections.labels(reason, self.tenants.label(tenant_id)).inc()

    def retried(self, model: str) -> None:
        self.retries.labels(model).inc()

    def dispatched(self, model: str, pool: PoolConfig, reason: str) -> None:
        labels = self._pools.get(id(pool))
        self.routing.labels(model, labels.name if labels is not None else pool.device,
                            reason).inc()
        if labels is not None and labels.fallback_from is not None:
            self.fallbacks.labels(model, labels.fallback_from, pool.device).inc()

    def finished(self, event: UsageEvent, model: str | None, pool: PoolConfig | None,
                 admitted: bool) -> None:
        model = model or UNKNOWN
        if pool is None:
            pool_name = NONE
        else:
            labels = self._pools.get(id(pool))
            pool_name = labels.name if labels is not None else pool.device
        key = (model, pool_name, event.pool or NONE,
               _STATUS_CLASSES[min(event.status // 100, 5)], self.tenants.count(event.tenant_id),
               event.endpoint)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, *key)
        series.requests.inc()
        for g in event.guardrails or ():
            self.guardrail_events.labels(g["stage"], g["category"], g["action"], key[4]).inc()
        if event.prompt_tokens:
            series.prompt.inc(event.prompt_tokens)
        if event.completion_tokens:
            series.completion.inc(event.completion_tokens)
        if event.cost_usd:
            series.cost.inc(event.cost_usd)
        if series.timings is not None:
            duration, ttft, tpot = series.timings
            duration.observe(event.latency_ms / 1000)
            if event.ttft_ms is not None:
                ttft.observe(event.ttft_ms / 1000)
                if event.completion_tokens > 1:
                    tpot.observe((event.latency_ms - event.ttft_ms) / 1000
                                 / (event.completion_tokens - 1))
        if admitted:
            self._in_flight[model].dec()

    # Figures read in the background.

    def add_readings(self, readings: Iterable[Reading]) -> None:
        self._readings.add(readings)

    def add_collector(self, family: str, collector: Refreshed) -> None:
        """Families read in the background with the readings; a failed refresh clears them
        and counts under `family` in `llmops_metrics_collect_errors_total`."""
        self.registry.register(collector)
        self._collectors.append((family, collector))

    async def refresh(self) -> None:
        """One round of background work: hand out tenant labels, then read every family."""
        self.tenants.rank()
        await asyncio.gather(*(self._read(r) for r in self._readings.readings),
                             *(self._refresh(f, c) for f, c in self._collectors))

    async def _refresh(self, family: str, collector: Refreshed) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                await collector.refresh()
        except Exception as exc:  # as for a reading: the scrape goes on without these
            collector.clear()
            if family not in self._readings.failing:
                log.warning("metric family %s unavailable: %r", family, exc)
                self._readings.failing.add(family)
            self.collect_errors.labels(family).inc()
            return
        self._readings.failing.discard(family)

    async def _read(self, reading: Reading) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                values = dict(await reading.read())
        except Exception as exc:  # whatever fails, the scrape goes on without this family
            self._readings.values.pop(reading.name, None)
            if reading.name not in self._readings.failing:  # once, not every round
                log.warning("metric family %s unavailable: %r", reading.name, exc)
                self._readings.failing.add(reading.name)
            self.collect_errors.labels(reading.name).inc()
            return
        self._readings.values[reading.name] = values
        self._readings.failing.discard(reading.name)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.config.refresh_s)

    # Scrapes.

    def authorized(self, authorization: str | None) -> bool:
        """Whether a scrape with this `Authorization` header may read the metrics."""
        return authorized(self.config.token, authorization)

    def exposition(self) -> bytes:
        """Every family in Prometheus' text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _Backends:
    """Health and circuit state of every replica, as the routers see them now."""

    def __init__(self, routers: Mapping[str, Router], pools: Mapping[int, _Pool]) -> None:
        self.routers = routers
        self.pools = pools

    def describe(self) -> list[Metric]:
        return list(self._families())

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("llmops_backend_healthy",
                              "1 when the replica passes its health probes.",
                              labels=["model", "pool", "replica"]),
            GaugeMetricFamily("llmops_circuit_state",
                              "1 for the current state of the replica's circuit breaker.",
                              labels=["model", "replica", "state"]),
        )

    def collect(self) -> list[Metric]:
        healthy, circuit = self._families()
        for model, router in self.routers.items():
            for replica in router.replicas:
                pool = self.pools.get(id(replica.config))
                healthy.add_metric([model, pool.name if pool else replica.device, replica.url],
                                   1.0 if replica.healthy else 0.0)
                current = replica.circuit.state
                for state in type(current):
                    circuit.add_metric([model, replica.url, state.value],
                                       1.0 if state is current else 0.0)
        return [healthy, circuit]


class _Readings:
    """The families read in the background, from their last good values."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.values: dict[str, dict[str, float]] = {}
        self.failing: set[str] = set()

    def add(self, readings: Iterable[Reading]) -> None:
        self.readings += readings

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(r.name, r.documentation, labels=[r.label])
                for r in self.readings]

    def collect(self) -> list[Metric]:
        out: list[Metric] = []
        for reading in self.readings:
            values = self.values.get(reading.name)
            if values is None:
                continue
            family = GaugeMetricFamily(reading.name, reading.documentation,
                                       labels=[reading.label])
            for value, figure in values.items():
                family.add_metric([value], figure)
            out.append(family)
        return out
