"""Which models a caller may see and use: the same rule lists models, serves them and admits
them into evals, so that no path shows or runs what another hides."""

from __future__ import annotations

from llmops.catalog import Catalog, CatalogEntry
from llmops.errors import BadRequestError, ModelNotFoundError
from tenancy.tenants import Principal

__all__ = ["may_see", "usable_entry"]


def may_see(catalog: Catalog, who: Principal, entry: CatalogEntry) -> bool:
    """The key's model allow-list admits `entry`, and the catalog shows it to the key's tenant:
    a fine-tuned adapter to its owner (and admins) only, a withheld candidate to admins and to
    our workers acting for its owner (`who.delegated`) only."""
    return who.may_use(entry.name) and catalog.visible_to(entry, who.tenant_id, who.is_admin,
                                                          who.delegated)


def usable_entry(catalog: Catalog, who: Principal, model: str, kind: str,
                 endpoint: str) -> CatalogEntry:
    """The catalog entry `who` is served for `model` at `endpoint` (which serves models of
    `kind`): ModelNotFoundError when it does not exist or `who` may not see it (the same
    answer: no information leak), BadRequestError when it is of another kind. The gateway's
    requests and a batch's lines are checked by this one rule."""
    entry = catalog.resolve(model)
    if entry is None or not may_see(catalog, who, entry):
        raise ModelNotFoundError(model)
    if entry.base.kind != kind:
        raise BadRequestError(
            f"The model `{model}` is a {entry.base.kind} model and cannot be used "
            f"with {endpoint}.", param="model", code="model_not_supported")
    return entry
