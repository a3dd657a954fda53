"""Bounded tenant labels: a flood of tenants (or of keys in new tenants) cannot multiply the
gateway's series in Prometheus.

A tenant gets its own label value when it is on the configured allow-list, or when it is among
the busiest tenants (by requests since start) at one of the periodic rankings while there is a
free slot (`top` slots in all). A slot, once given, is kept for the life of the process: series
never vanish, so counters stay monotonic and `sum()` over tenants stays right. Every other
tenant is counted as `other`. Until every slot is taken, requests are tallied per tenant in a
table of bounded size (lossy counting: when it fills up, the busier half is kept).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["OTHER", "TenantLabels"]

OTHER = "other"


class TenantLabels:
    def __init__(self, top: int, always: Iterable[str] = (), *, capacity: int | None = None
                 ) -> None:
        self._labels = {t: t for t in always}
        self.free_slots = top
        self._counts: dict[str, int] = {}
        self._capacity = capacity or max(64, 8 * top)

    def label(self, tenant: str) -> str:
        """The tenant's label value, without counting a request."""
        return self._labels.get(tenant, OTHER)

    def count(self, tenant: str) -> str:
        """Count one request of the tenant and return its label value (the hot path)."""
        label = self._labels.get(tenant)
        if label is not None:
            return label
        if self.free_slots:
            counts = self._counts
            counts[tenant] = counts.get(tenant, 0) + 1
            if len(counts) > self._capacity:
                kept = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
                self._counts = dict(kept[: self._capacity // 2])
        return OTHER

    def rank(self) -> list[str]:
        """Give free slots to the busiest tenants counted so far; returns those promoted."""
        if not self.free_slots:
            self._counts.clear()
            return []
        busiest = sorted(self._counts.items(), key=lambda kv: kv[1], reverse=True)
        promoted = [tenant for tenant, _ in busiest[: self.free_slots]]
        for tenant in promoted:
            self._labels[tenant] = tenant
            del self._counts[tenant]
        self.free_slots -= len(promoted)
        if not self.free_slots:
            self._counts.clear()
        return promoted

    @property
    def labelled(self) -> frozenset[str]:
        """Tenants that have a label value of their own."""
        return frozenset(self._labels)
