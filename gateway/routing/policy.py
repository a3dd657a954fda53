"""Routing policy: pools in priority order; within a pool, filters then weighted scorers then
a picker. Each filter and scorer is small and testable alone; the scorer set and weights come
from configuration through the `SCORERS` registry. Each choice comes with its reason, one of
`REASONS`."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from gateway.inference.protocol import OpenAIRequest
from gateway.routing.hashing import bounded_home, load, load_bound
from gateway.routing.prefix import PrefixHolders, PrefixIndex
from gateway.routing.replica import Pool, Replica
from llmops.settings import RoutingConfig

__all__ = [
    "REASONS",
    "SCORERS",
    "AdapterAffinity",
    "Decision",
    "Filter",
    "PrefixScorer",
    "RouteRequest",
    "Router",
    "Scorer",
    "SessionScorer",
    "WeightedScorer",
    "build_affinity",
    "build_prefixes",
    "build_scorers",
    "per_replica",
]

# Why a replica was chosen: its share of the prompt's prefix (or the prefix's home), the
# session's home, its load, its LoRA adapter, or because a lower-priority pool served.
REASONS = ("prefix", "session", "load", "adapter", "fallback")


@dataclass(frozen=True)
class RouteRequest:
    """What routing knows of one request: filters and scorers may read all of it."""

    adapter: str | None = None  # a LoRA adapter the replica must have loaded
    exclude: frozenset[int] = frozenset()  # ids of replicas already tried for this request
    request: OpenAIRequest | None = None  # the body as the engine is sent it (none: our own)
    session: str | None = None  # prompt_cache_key or the x-session-id header
    blocks: tuple[int, ...] = ()  # the prompt's prefix hash chain (`prefix_blocks`)
    # Leading blocks each replica (by URL) likely holds: the router fills it in.
    held: Mapping[str, int] = field(default_factory=dict)


class Filter(Protocol):
    def __call__(self, request: RouteRequest, replicas: Iterable[Replica]) -> list[Replica]: ...


class Scorer(Protocol):
    """Scores each candidate for a request in [0, 1], higher better, all at once: a scorer may
    compare them (a session's home is one of them)."""

    def __call__(self, request: RouteRequest, replicas: Sequence[Replica]) -> list[float]: ...


def per_replica(score: Callable[[RouteRequest, Replica], float]) -> Scorer:
    """A scorer that looks at one replica at a time."""
    def scorer(request: RouteRequest, replicas: Sequence[Replica]) -> list[float]:
        return [score(request, r) for r in replicas]
    return scorer


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


@dataclass(frozen=True)
class SessionScorer:
    """1 for the session's home: its consistent-hashing replica within bounded loads, so that
    a conversation stays where its history is cached, and every gateway sends it there."""

    load_factor: float
    load_floor: int

    def __call__(self, request: RouteRequest, replicas: Sequence[Replica]) -> list[float]:
        if request.session is None:
            return [0.0] * len(replicas)
        home = bounded_home(request.session.encode(), replicas, self.load_factor,
                            self.load_floor)
        return [1.0 if r is home else 0.0 for r in replicas]


@dataclass(frozen=True)
class PrefixScorer:
    """The share of the prompt's blocks a replica likely holds, unless its load is past the
    bound (then its cache is not worth the wait). A prefix no replica is known to hold goes to
    its first block's home, as for a session, so that gateways that never saw it agree."""

    load_factor: float
    load_floor: int

    def __call__(self, request: RouteRequest, replicas: Sequence[Replica]) -> list[float]:
        blocks = request.blocks
        if not blocks:
            return [0.0] * len(replicas)
        bound = load_bound(replicas, self.load_factor, self.load_floor)
        held = request.held
        if held:
            total = len(blocks)
            scores = [held.get(r.url, 0) / total if load(r) + 1 <= bound else 0.0
                      for r in replicas]
            if any(scores):
                return scores
        home = bounded_home(blocks[0].to_bytes(8, "little"), replicas, self.load_factor,
                            self.load_floor)
        return [1.0 if r is home else 0.0 for r in replicas]


# Each scorer's factory, by the name its weight has in the settings (`weight_<name>`).
SCORERS: dict[str, Callable[[RoutingConfig], Scorer]] = {
    "outstanding": lambda _: per_replica(outstanding_score),
    "queue": lambda _: per_replica(queue_score),
    "kv_cache": lambda _: per_replica(kv_cache_score),
    "prefix": lambda c: PrefixScorer(c.load_factor, c.load_floor),
    "session": lambda c: SessionScorer(c.load_factor, c.load_floor),
}


@dataclass(frozen=True)
class WeightedScorer:
    name: str
    scorer: Scorer
    weight: float


def build_scorers(config: RoutingConfig) -> list[WeightedScorer]:
    weights = {name: getattr(config, f"weight_{name}") for name in SCORERS}
    return [WeightedScorer(n, SCORERS[n](config), w) for n, w in weights.items() if w > 0]


def build_prefixes(config: RoutingConfig) -> PrefixIndex | None:
    """One model's prefix index (none while the prefix scorer is off)."""
    if config.weight_prefix == 0:
        return None
    return PrefixIndex(config.prefix_index_blocks, config.prefix_ttl_s, config.prefix_block_chars)


def build_affinity(config: RoutingConfig) -> AdapterAffinity | None:
    if config.adapter_affinity == 0:
        return None
    return AdapterAffinity(config.adapter_affinity, config.affinity_slack)


@dataclass(frozen=True, slots=True)
class Decision:
    replica: Replica
    reason: str  # one of REASONS


def pick(
    request: RouteRequest,
    replicas: Sequence[Replica],
    scorers: Sequence[WeightedScorer],
    rng: random.Random,
) -> Decision:
    """The replica with the highest weighted score; ties broken at random so equal replicas
    share load instead of the first one taking everything. The reason is the scorer that set
    the winner furthest above the lowest-scored candidate (`load` when none did)."""
    columns = [s.scorer(request, replicas) for s in scorers]
    totals = [sum(s.weight * column[i] for s, column in zip(scorers, columns, strict=True))
              for i in range(len(replicas))]
    top = max(totals)
    best = [i for i, total in enumerate(totals) if total >= top - 1e-9]
    winner = best[0] if len(best) == 1 else rng.choice(best)
    reason, margin = "load", 1e-9
    for s, column in zip(scorers, columns, strict=True):
        lead = s.weight * (column[winner] - min(column))
        if lead > margin and s.name in REASONS:
            reason, margin = s.name, lead
    return Decision(replicas[winner], reason)


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
        prefixes: PrefixHolders | None = None,
    ) -> None:
        self.pools = sorted(pools, key=lambda p: -p.priority)
        self.scorers = list(scorers)
        self.filters = list(filters) + ([affinity] if affinity is not None else [])
        self.affinity = affinity
        self.prefixes = prefixes  # where this model's prefixes were sent; none: not tracked
        self.rng = rng or random.Random()

    @property
    def replicas(self) -> list[Replica]:
        return [r for pool in self.pools for r in pool.replicas]

    def choose(self, request: RouteRequest) -> Replica | None:
        decision = self.decide(request)
        return None if decision is None else decision.replica

    def decide(self, request: RouteRequest) -> Decision | None:
        """The highest-priority pool with a fit replica that has capacity wins. When every fit
        replica is full, the request queues at the highest-priority pool that has one. The
        chosen replica is remembered as holding the request's adapter and prefix."""
        prefixes = self.prefixes
        if prefixes is not None and request.blocks:
            request = replace(request, held=prefixes.matched(request.blocks))
        decision = self._choose(request)
        if decision is None:
            return None
        chosen = decision.replica
        if request.adapter is not None and self.affinity is not None:
            if request.adapter in chosen.recent_adapters and decision.reason != "fallback":
                decision = Decision(chosen, "adapter")
            chosen.sent_adapter(request.adapter, self.affinity.keep)
        if prefixes is not None and request.blocks:
            prefixes.record(chosen.url, request.blocks)
        return decision

    def _choose(self, request: RouteRequest) -> Decision | None:
        overflow: list[Replica] | None = None
        for level, pool in enumerate(self.pools):
            fit: list[Replica] = pool.replicas
            for f in self.filters:
                fit = f(request, fit)
            if not fit:
                continue
            roomy = with_capacity(request, fit)
            if roomy:
                return self._fallback(pick(request, roomy, self.scorers, self.rng), level)
            if overflow is None:
                overflow = fit
                overflow_level = level
        if overflow is not None:
            return self._fallback(pick(request, overflow, self.scorers, self.rng),
                                  overflow_level)
        return None

    @staticmethod
    def _fallback(decision: Decision, level: int) -> Decision:
        return decision if level == 0 else Decision(decision.replica, "fallback")
