"""Tenants and API keys: creation, lookup, update and revocation.

A key is `sk-llmops-` followed by 43 random URL-safe characters (256 bits). Only its SHA-256 is
stored, with a short visible prefix to recognise it in listings; the plain key is returned
once, at creation. High-entropy keys make a slow password hash unnecessary.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from guardrails.schema import GuardrailsPolicy
from llmops.store import ApiKey, Database, Tenant, aware, utcnow

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

KEY_PREFIX = "sk-llmops-"
ADMIN_TENANT = "ten_admin"  # the bootstrap admin key's tenant
# An admin caller (our workers) names the key it acts for in this header: see tenancy.auth.
ON_BEHALF_HEADER = "x-llmops-on-behalf-of"


_Row = TypeVar("_Row", Tenant, ApiKey)
_NOUNS: dict[type[Any], str] = {Tenant: "tenant", ApiKey: "key"}


class NotFoundError(LookupError):
    pass


class ConflictError(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: str = "month"

    @classmethod
    def of(cls, row: Tenant | ApiKey) -> Limits:
        budget = float(row.budget_usd) if row.budget_usd is not None else None
        return cls(row.rpm_limit, row.tpm_limit, budget, row.budget_period)


@dataclass(frozen=True)
class Principal:
    """Who a request is: a key, its tenant, and the limits and guardrail policies of both."""

    key_id: str
    tenant_id: str
    role: str
    models: tuple[str, ...] | None  # allowed model names or glob patterns; None: all
    key_limits: Limits
    tenant_limits: Limits
    expires_at: datetime | None = None
    tenant_guardrails: GuardrailsPolicy | None = None
    key_guardrails: GuardrailsPolicy | None = None
    delegated: bool = False  # an admin caller (one of our workers) acts for this key
    weight: int = 1  # the tenant's fair share of busy replicas

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, model: str) -> bool:
        if self.models is None:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class Tenancy:
    def __init__(self, db: Database) -> None:
        self.db = db

    # Tenants

    async def create_tenant(self, name: str, *, limits: Limits = Limits(),
                            metadata: dict[str, Any] | None = None,
                            guardrails: dict[str, Any] | None = None,
                            weight: int = 1) -> Tenant:
        tenant = Tenant(id=_new_id("ten"), name=name, metadata_=metadata or {},
                        guardrails=guardrails, weight=weight)
        _apply_limits(tenant, limits)
        async with self.db.session() as session:
            session.add(tenant)
            try:
                await session.commit()
            except IntegrityError:
                raise ConflictError(f"a tenant named {name!r} already exists") from None
        return tenant

    async def list_tenants(self) -> list[Tenant]:
        async with self.db.session() as session:
            return list(await session.scalars(select(Tenant).order_by(Tenant.created_at)))

    async def get_tenant(self, tenant_id: str) -> Tenant:
        return await self._get(Tenant, tenant_id)

    async def update_tenant(self, tenant_id: str, **fields: Any) -> Tenant:
        return await self._update(Tenant, tenant_id, fields)

    async def disable_tenant(self, tenant_id: str) -> Tenant:
        """Every key of a disabled tenant stops working; its ledger stays."""
        return await self.update_tenant(tenant_id, disabled_at=utcnow())

    async def delete_tenant(self, tenant_id: str) -> None:
        """Remove the tenant's keys, then its row: the last step of its deletion (the
        gateway's `TenantDeletion` removes what it owns first). Its ledger stays."""
        async with self.db.session() as session:
            await session.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant_id))
            await session.execute(delete(Tenant).where(Tenant.id == tenant_id))
            await session.commit()

    # Keys

    async def create_key(
        self,
        tenant_id: str,
        *,
        name: str = "",
        role: str = "member",
        models: list[str] | None = None,
        limits: Limits = Limits(),
        expires_at: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        guardrails: dict[str, Any] | None = None,
    ) -> tuple[ApiKey, str]:
        """The new key's row and its plain value, which is never shown again."""
        await self.get_tenant(tenant_id)
        plain = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(id=_new_id("key"), tenant_id=tenant_id, name=name, role=role,
                     prefix=plain[: len(KEY_PREFIX) + 6], hash=hash_key(plain), models=models,
                     expires_at=expires_at, metadata_=metadata or {}, guardrails=guardrails)
        _apply_limits(key, limits)
        async with self.db.session() as session:
            session.add(key)
            await session.commit()
        return key, plain

    async def list_keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        async with self.db.session() as session:
            return list(await session.scalars(query))

    async def get_key(self, key_id: str) -> ApiKey:
        return await self._get(ApiKey, key_id)

    async def update_key(self, key_id: str, **fields: Any) -> ApiKey:
        return await self._update(ApiKey, key_id, fields)

    async def revoke_key(self, key_id: str) -> ApiKey:
        return await self.update_key(key_id, revoked_at=utcnow())

    async def _get(self, table: type[_Row], row_id: str) -> _Row:
        async with self.db.session() as session:
            row = await session.get(table, row_id)
        if row is None:
            raise NotFoundError(f"no {_NOUNS[table]} {row_id!r}")
        return row

    async def _update(self, table: type[_Row], row_id: str, fields: dict[str, Any]) -> _Row:
        async with self.db.session() as session:
            row = await session.get(table, row_id)
            if row is None:
                raise NotFoundError(f"no {_NOUNS[table]} {row_id!r}")
            for name, value in fields.items():
                setattr(row, name, value)
            try:
                await session.commit()
            except IntegrityError:
                raise ConflictError(f"another {_NOUNS[table]} has that name") from None
        return row

    async def principal(self, plain: str) -> Principal | None:
        """The principal of a presented key, or None when it is unknown, revoked, expired or
        its tenant is disabled."""
        return await self.principal_by_digest(hash_key(plain))

    async def principal_by_digest(self, digest: str) -> Principal | None:
        """`principal` for a key known by its digest (a console session keeps only that)."""
        async with self.db.session() as session:
            row = (await session.execute(
                select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id)
                .where(ApiKey.hash == digest))).first()
        if row is None:
            return None
        key, tenant = row
        if not hmac.compare_digest(key.hash, digest):
            return None
        return _usable(key, tenant)

    async def oldest_usable_key(self, tenant_id: str) -> str | None:
        """The id of the tenant's oldest key that can still be used, or None (no such key, or
        the tenant is disabled or unknown)."""
        async with self.db.session() as session:
            rows = (await session.execute(
                select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id)
                .where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
                .order_by(ApiKey.created_at, ApiKey.id))).all()
        return next((key.id for key, tenant in rows if _usable(key, tenant) is not None), None)

    async def principal_of(self, key_id: str) -> Principal | None:
        """The principal of a key named by id (for our own workers acting for the key that
        started their work), or None when it is unknown, revoked, expired or its tenant is
        disabled."""
        async with self.db.session() as session:
            row = (await session.execute(
                select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id)
                .where(ApiKey.id == key_id))).first()
        return None if row is None else _usable(*row)


def _usable(key: ApiKey, tenant: Tenant) -> Principal | None:
    """The key's principal, unless it or its tenant can no longer be used."""
    if key.revoked_at is not None or tenant.disabled_at is not None:
        return None
    if key.expires_at is not None and aware(key.expires_at) <= utcnow():
        return None
    return Principal(key.id, tenant.id, key.role,
                     tuple(key.models) if key.models is not None else None,
                     Limits.of(key), Limits.of(tenant), key.expires_at,
                     _policy(tenant.guardrails), _policy(key.guardrails),
                     weight=tenant.weight)


def _apply_limits(row: Tenant | ApiKey, limits: Limits) -> None:
    row.rpm_limit, row.tpm_limit = limits.rpm, limits.tpm
    row.budget_usd = Decimal(str(limits.budget_usd)) if limits.budget_usd is not None else None
    row.budget_period = limits.budget_period


def _policy(stored: dict[str, Any] | None) -> GuardrailsPolicy | None:
    # Validated when an admin set it; parsed here once per key lookup, not per request.
    return GuardrailsPolicy.model_validate(stored) if stored else None
