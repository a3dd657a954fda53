"""The model catalog: configured base models plus the LoRA adapters the engines report.

Adapters are discovered, not configured: vLLM lists every loaded adapter in its `/v1/models`
with `parent` set to the base model's served name. The catalog maps a public model name to
what the router needs: the base model's configuration and, for an adapter, its engine name.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from llmops.settings import ModelConfig

__all__ = ["FINE_TUNED", "Catalog", "CatalogEntry"]

FINE_TUNED = "ft:"  # how fine-tuned adapters' names begin (`finetune.jobs.adapter_name`)


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # what clients send as `model`
    base: ModelConfig
    adapter: str | None = None  # the LoRA adapter's name in vLLM
    created: int = 0

    @property
    def upstream_name(self) -> str:
        return self.adapter or self.base.upstream_name


class Catalog:
    def __init__(self, models: Iterable[ModelConfig]) -> None:
        now = int(time.time())
        self._bases = {m.name: CatalogEntry(m.name, m, created=now) for m in models}
        self._adapters: dict[str, CatalogEntry] = {}
        self.owners: dict[str, str] = {}  # fine-tuned adapter -> the tenant that trained it
        # Adapters under evaluation, or held back by it: served to our workers only.
        self.withheld: set[str] = set()
        self.details: dict[str, dict[str, Any]] = {}  # extra /v1/models fields of an adapter

    def resolve(self, name: str) -> CatalogEntry | None:
        return self._bases.get(name) or self._adapters.get(name)

    def visible_to(self, entry: CatalogEntry, tenant_id: str, admin: bool,
                   delegated: bool = False) -> bool:
        """A tenant's fine-tuned adapters are its own; everything else is shared. A candidate
        withheld adapter is seen only by admins and by our workers acting for its owner
        (`delegated`). A fine-tuned adapter an engine reports before this gateway has learnt
        its owner is nobody's until then."""
        if entry.name in self.withheld and not (admin or delegated):
            return False
        owner = self.owners.get(entry.name)
        if owner is None:
            return admin or not entry.name.startswith(FINE_TUNED)
        return admin or owner == tenant_id

    def entries(self) -> list[CatalogEntry]:
        return [*self._bases.values(), *self._adapters.values()]

    @property
    def bases(self) -> list[ModelConfig]:
        return [e.base for e in self._bases.values()]

    def set_adapters(self, base: str, adapters: Iterable[str]) -> None:
        """Replace the adapters known for base model `base` (by its public name)."""
        config = self._bases[base].base
        keep = {k: v for k, v in self._adapters.items() if v.base.name != base}
        now = int(time.time())
        for name in adapters:
            if name in self._bases:
                continue  # a base name always wins; an adapter may not shadow it
            previous = self._adapters.get(name)
            created = previous.created if previous else now
            keep[name] = CatalogEntry(name, config, adapter=name, created=created)
        self._adapters = keep
