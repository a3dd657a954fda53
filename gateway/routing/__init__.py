"""Replica selection: filters drop unfit replicas, weighted scorers rank the rest, a picker
chooses; pools are tried in priority order (GPU first, CPU as the fallback behind it)."""

from gateway.routing.circuit import Circuit, CircuitState
from gateway.routing.policy import (
    REASONS,
    SCORERS,
    AdapterAffinity,
    Decision,
    Filter,
    Router,
    Scorer,
    WeightedScorer,
    build_affinity,
    build_prefixes,
    build_scorers,
)
from gateway.routing.prefix import PrefixHolders, PrefixIndex, prefix_blocks
from gateway.routing.replica import Pool, Replica

__all__ = [
    "REASONS",
    "SCORERS",
    "AdapterAffinity",
    "Circuit",
    "CircuitState",
    "Decision",
    "Filter",
    "Pool",
    "PrefixHolders",
    "PrefixIndex",
    "Replica",
    "Router",
    "Scorer",
    "WeightedScorer",
    "build_affinity",
    "build_prefixes",
    "build_scorers",
    "prefix_blocks",
]
