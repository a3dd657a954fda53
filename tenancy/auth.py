"""Who is calling: API keys resolved to principals, with a short-lived cache so that the
database is not asked on every request. Keys are compared by SHA-256 digest in constant time;
the bootstrap admin key from the settings is known only by its digest. While the database is
unreachable, a key looked up before is trusted as last seen, and an unknown one gets a 503.

Acting for another key: a request made with an admin key may name another key's id in the
`x-llmops-on-behalf-of` header; it is then served as that key (its tenant, model allow-list,
limits and budgets, and the usage ledger's tenant and key). Our eval workers use this to call
models for the key that started the run. The named key must still be usable (not revoked or
expired, its tenant not disabled); a non-admin key that sends the header is refused (403)."""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from sqlalchemy.exc import SQLAlchemyError

from llmops.errors import (
    AuthenticationError,
    BadRequestError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from llmops.store import aware, utcnow
from tenancy.tenants import (
    ADMIN_TENANT,
    ON_BEHALF_HEADER,
    Limits,
    Principal,
    Tenancy,
    hash_key,
)

__all__ = ["BOOTSTRAP_ADMIN", "ON_BEHALF_HEADER", "Authenticator", "acting_for", "stand_in_key"]

log = logging.getLogger(__name__)

_CACHE_MAX = 10_000
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")

BOOTSTRAP_ADMIN = Principal("key_bootstrap_admin", ADMIN_TENANT, "admin", None, Limits(),
                            Limits())


async def acting_for(tenancy: Tenancy, key_id: str) -> Principal | None:
    """Who our own machinery (a worker, the watch scheduler) is when it acts for the key that
    started its work: that key, `delegated`; None when the key is unknown, revoked or expired,
    or its tenant is disabled."""
    if key_id == BOOTSTRAP_ADMIN.key_id:
        return BOOTSTRAP_ADMIN
    found = await tenancy.principal_of(key_id)
    return None if found is None else replace(found, delegated=True)


async def stand_in_key(tenancy: Tenancy, tenant_id: str) -> str | None:
    """The key to act for in a tenant's work that recorded no key (work started before keys
    were recorded): the bootstrap admin key for the admin tenant, else the tenant's oldest
    usable key, so that the tenant, never the admin, pays; None when it has none."""
    if tenant_id == ADMIN_TENANT:
        return BOOTSTRAP_ADMIN.key_id
    return await tenancy.oldest_usable_key(tenant_id)


class Authenticator:
    """Resolves a request's bearer key (and the key it acts for, if any) to its principal."""

    def __init__(self, tenancy: Tenancy, admin_key_hash: str | None, ttl_s: float) -> None:
        self.tenancy = tenancy
        self.admin_key_hash = admin_key_hash
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def authenticate(self, authorization: str | None, acting_for: str | None
                           ) -> Principal:
        """The principal of an `Authorization: Bearer` header, or an error in OpenAI's shape."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        principal = await self.resolve(key)
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        if acting_for is not None:
            principal = await self.on_behalf(principal, acting_for)
        return principal

    async def resolve(self, key: str) -> Principal | None:
        return await self.by_digest(hash_key(key))

    async def by_digest(self, digest: str) -> Principal | None:
        """The principal of the key with this SHA-256 digest (a console session keeps only
        the digest), while the key is usable; a rotated bootstrap key no longer matches."""
        if self.admin_key_hash is not None and hmac.compare_digest(digest,
                                                                   self.admin_key_hash):
            return BOOTSTRAP_ADMIN
        return await self._lookup(digest, lambda: self.tenancy.principal_by_digest(digest))

    async def on_behalf(self, caller: Principal, key_id: str) -> Principal:
        """The principal of the key an admin caller acts for."""
        if not caller.is_admin:
            raise PermissionDeniedError(
                f"Only admin keys may act on behalf of another key ({ON_BEHALF_HEADER}).")
        if not _KEY_ID.match(key_id):
            raise BadRequestError(f"{ON_BEHALF_HEADER} must be a key id.")
        acting = await self._lookup(f"id:{key_id}", lambda: acting_for(self.tenancy, key_id))
        if acting is None:
            raise AuthenticationError(
                f"The key named by {ON_BEHALF_HEADER} is unknown, revoked or expired.")
        return acting

    async def _lookup(self, cache_key: str,
                      fetch: Callable[[], Awaitable[Principal | None]]) -> Principal | None:
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            try:
                principal = await fetch()
            except (SQLAlchemyError, OSError):
                if cached is not None:  # stale if error: the key store is down, not the key
                    log.warning("key store unreachable; trusting a cached key lookup")
                    return self._unexpired(cached[1])
                raise ServiceUnavailableError(
                    "The key store is unreachable; try again shortly.",
                    headers={"retry-after": "1"}) from None
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()  # bounded: a flood of made-up keys cannot grow it
            self._cache[cache_key] = (now + self.ttl_s, principal)
        return self._unexpired(principal)

    @staticmethod
    def _unexpired(principal: Principal | None) -> Principal | None:
        if principal is not None and principal.expires_at is not None \
                and aware(principal.expires_at) <= utcnow():
            return None  # expired while cached
        return principal

    def forget(self) -> None:
        """Drop cached lookups (after an admin changed keys in this process)."""
        self._cache.clear()
