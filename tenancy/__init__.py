"""Tenancy: tenants and their API keys, who is calling (auth), limits and budgets, prices, and
the usage ledger. The names most callers need are exported here."""

from tenancy.tenants import (
    ADMIN_TENANT,
    KEY_PREFIX,
    ON_BEHALF_HEADER,
    ConflictError,
    Limits,
    NotFoundError,
    Principal,
    Tenancy,
    hash_key,
)

__all__ = [
    "ADMIN_TENANT",
    "KEY_PREFIX",
    "ON_BEHALF_HEADER",
    "ConflictError",
    "Limits",
    "NotFoundError",
    "Principal",
    "Tenancy",
    "hash_key",
]
