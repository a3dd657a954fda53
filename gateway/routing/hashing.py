"""Consistent hashing with bounded loads: a key (a session, a prompt's first block) has a home
replica that every gateway computes alike from the replicas' URLs alone, so gateways agree
without sharing state; a home busier than `factor` times the average is passed over for the
key's next replica in its order.

The order is rendezvous hashing (each replica ranked by a hash of key and URL): a ring
without virtual nodes to build or cache, an even spread, and when a replica leaves, only its
keys move.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from gateway.routing.replica import Replica

__all__ = ["bounded_home", "load", "load_bound"]


def load(replica: Replica) -> float:
    """Requests this gateway has in flight there plus vLLM's own queue (seen by every gateway)."""
    return replica.outstanding + replica.waiting


def load_bound(replicas: Sequence[Replica], factor: float, floor: int) -> float:
    """The most load a home may have once it takes this request: `factor` times the average
    (this request counted), rounded up, and never under `floor`, so that light loads do not
    move keys."""
    average = (sum(load(r) for r in replicas) + 1) / max(len(replicas), 1)
    return max(math.ceil(factor * average), floor)


def bounded_home(key: bytes, replicas: Sequence[Replica], factor: float, floor: int
                 ) -> Replica | None:
    """The first replica in `key`'s order whose load is within the bound (the least loaded
    if, with fractional queue lengths, none is)."""
    if not replicas:
        return None
    bound = load_bound(replicas, factor, floor)
    ranked = sorted(replicas, key=lambda r: _rank(key, r.url), reverse=True)
    for replica in ranked:
        if load(replica) + 1 <= bound:
            return replica
    return min(ranked, key=load)


def _rank(key: bytes, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + url.encode(), digest_size=8).digest(), "little")
