"""Which models a caller may see and use: the same rule lists models, serves them and admits
them into evals, so that no path shows or runs what another hides."""

from __future__ import annotations

from llmops.catalog import Catalog, CatalogEntry
from tenancy.tenants import Principal

__all__ = ["may_see"]


def may_see(catalog: Catalog, who: Principal, entry: CatalogEntry) -> bool:
    """The key's model allow-list admits `entry`, and the catalog shows it to the key's tenant:
    a fine-tuned adapter to its owner (and admins) only, a withheld candidate to admins and to
    our workers acting for its owner (`who.delegated`) only."""
    return who.may_use(entry.name) and catalog.visible_to(entry, who.tenant_id, who.is_admin,
                                                          who.delegated)
