"""Routing policy: pools in priority order; within a pool, filters then weighted scorers then
a picker. Each filter and scorer is small and testable alone; the scorer set and weights come
from configuration through the `SCORERS` registry."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.inference.protocol import OpenAIRequest
from gateway.routing.replica import Pool, Replica
from llmops.settings import RoutingConfig

__all__ = [
    "SCORERS",
    "AdapterAffinity",
    "Filter",
    "RouteRequest",
    "Router",
    "Scorer",
    "WeightedScorer",
    "build_affinity",
    "build_scorers",
]


@dataclass(frozen=True)
class RouteRequest:
    """What routing knows of one request: filters and scorers may read all of it."""

    adapter: str | None = None  # a LoRA adapter the replica must have loaded
    exclude: frozenset[int] = frozenset()  # ids of replicas already tried for this request
    request: OpenAIRequest | None = None  # the body as the engine is sent it (none: our own)


class Filter(Protocol):
    def __call__(self, request: RouteRequest, replicas: Iterable[Replica]) -> list[Replica]: ...


# Scores a replica for a request in [0, 1]; higher is better.
Scorer = Callable[[RouteRequest, Replica], float]


def available(request: RouteRequest, replicas: Iterable[Replica]) -> list[Replica]:
    """Healthy, circuit admitting, and not already tried for this request."""
    return [r for r in replicas if r.available and id(r) not in request.exclude]


def adapter_loaded(request: RouteRequest, replicas: Iterable[Replica]) -> list[Replica]:
    if request.adapter is None:
        return list(replicas)
    return [r for r in replicas if request.adapter in r.adapters]


@dataclass(frozen=True)
class AdapterAffinity:
    """Sends an adapter's requests where it was sent lately, so that vLLM finds it in its
    LoRA cache instead of loading it again (every replica lists every registered adapter, so
    `adapter_loaded` cannot tell). The replicas that had it win unless the least busy of them
    has `slack` more requests outstanding than the least busy of all, or none has room."""

    keep: int  # adapters remembered per replica: vLLM's --max-loras
    slack: int

    def __call__(self, request: RouteRequest, replicas: Iterable[Replica]) -> list[Replica]:
        fit = list(replicas)
        if request.adapter is None or not fit:
            return fit
        homes = [r for r in fit if request.adapter in r.recent_adapters and r.has_capacity]
        if homes and (min(r.outstanding for r in homes)
                      <= min(r.outstanding for r in fit) + self.slack):
            return homes
        return fit


def with_capacity(_: RouteRequest, replicas: Iterable[Replica]) -> list[Replica]:
    return [r for r in replicas if r.has_capacity]


def outstanding_score(_: RouteRequest, replica: Replica) -> float:
    return 1.0 - min(replica.outstanding / replica.max_concurrency, 1.0)


def queue_score(_: RouteRequest, replica: Replica) -> float:
    return 1.0 - min(replica.waiting / max(replica.max_waiting, 1), 1.0)


def kv_cache_score(_: RouteRequest, replica: Replica) -> float:
    return 1.0 - min(max(replica.kv_cache_usage, 0.0), 1.0)


SCORERS: dict[str, Scorer] = {
    "outstanding": outstanding_score,
    "queue": queue_score,
    "kv_cache": kv_cache_score,
}


@dataclass(frozen=True)
class WeightedScorer:
    name: str
    scorer: Scorer
    weight: float


def build_scorers(config: RoutingConfig) -> list[WeightedScorer]:
    weights = {
        "outstanding": config.weight_outstanding,
        "queue": config.weight_queue,
        "kv_cache": config.weight_kv_cache,
    }
    return [WeightedScorer(n, SCORERS[n], w) for n, w in weights.items() if w > 0]


def build_affinity(config: RoutingConfig) -> AdapterAffinity | None:
    if config.adapter_affinity == 0:
        return None
    return AdapterAffinity(config.adapter_affinity, config.affinity_slack)


def pick(
    request: RouteRequest,
    replicas: Sequence[Replica],
    scorers: Sequence[WeightedScorer],
    rng: random.Random,
) -> Replica:
    """The replica with the highest weighted score; ties broken at random so equal replicas
    share load instead of the first one taking everything."""
    best: list[Replica] = []
    best_score = float("-inf")
    for replica in replicas:
        score = sum(s.weight * s.scorer(request, replica) for s in scorers)
        if score > best_score + 1e-9:
            best, best_score = [replica], score
        elif abs(score - best_score) <= 1e-9:
            best.append(replica)
    return best[0] if len(best) == 1 else rng.choice(best)


class Router:
    """Chooses a replica for one model among its pools."""

    def __init__(
        self,
        pools: Sequence[Pool],
        scorers: Sequence[WeightedScorer],
        *,
        filters: Sequence[Filter] = (available, adapter_loaded),
        rng: random.Random | None = None,
        affinity: AdapterAffinity | None = None,
    ) -> None:
        self.pools = sorted(pools, key=lambda p: -p.priority)
        self.scorers = list(scorers)
        self.filters = list(filters) + ([affinity] if affinity is not None else [])
        self.affinity = affinity
        self.rng = rng or random.Random()

    @property
    def replicas(self) -> list[Replica]:
        return [r for pool in self.pools for r in pool.replicas]

    def choose(self, request: RouteRequest) -> Replica | None:
        """The highest-priority pool with a fit replica that has capacity wins. When every fit
        replica is full, the request queues at the highest-priority pool that has one."""
        chosen = self._choose(request)
        if chosen is not None and request.adapter is not None and self.affinity is not None:
            chosen.sent_adapter(request.adapter, self.affinity.keep)
        return chosen

    def _choose(self, request: RouteRequest) -> Replica | None:
        overflow: list[Replica] | None = None
        for pool in self.pools:
            fit: list[Replica] = pool.replicas
            for f in self.filters:
                fit = f(request, fit)
            if not fit:
                continue
            roomy = with_capacity(request, fit)
            if roomy:
                return pick(request, roomy, self.scorers, self.rng)
            if overflow is None:
                overflow = fit
        if overflow is not None:
            return pick(request, overflow, self.scorers, self.rng)
        return None
