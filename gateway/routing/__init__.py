"""Replica selection: filters drop unfit replicas, weighted scorers rank the rest, a picker
chooses; pools are tried in priority order (GPU first, CPU as the fallback behind it)."""

from gateway.routing.circuit import Circuit, CircuitState
from gateway.routing.policy import (
    SCORERS,
    AdapterAffinity,
    Filter,
    Router,
    Scorer,
    WeightedScorer,
    build_affinity,
    build_scorers,
)
from gateway.routing.replica import Pool, Replica

__all__ = [
    "SCORERS",
    "AdapterAffinity",
    "Circuit",
    "CircuitState",
    "Filter",
    "Pool",
    "Replica",
    "Router",
    "Scorer",
    "WeightedScorer",
    "build_affinity",
    "build_scorers",
]
