"""Who is calling: API keys resolved to principals, with a short-lived cache so that the
database is not asked on every request. Keys are compared by SHA-256 digest in constant time;
the bootstrap admin key from the settings is known only by its digest. While the database is
unreachable, a key looked up before is trusted as last seen, and an unknown one gets a 503."""

from __future__ import annotations

import hmac
import logging
import time
from datetime import UTC

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request

from gateway.errors import AuthenticationError, PermissionDeniedError, ServiceUnavailableError
from llmops.store import utcnow
from llmops.tenancy import ADMIN_TENANT, Limits, Principal, Tenancy, hash_key

__all__ = ["Authenticator", "require_admin"]

log = logging.getLogger(__name__)

_CACHE_MAX = 10_000

BOOTSTRAP_ADMIN = Principal("key_bootstrap_admin", ADMIN_TENANT, "admin", None, Limits(),
                            Limits())


class Authenticator:
    """FastAPI dependency: sets `request.state.principal` or answers 401."""

    def __init__(self, tenancy: Tenancy, admin_key_hash: str | None, ttl_s: float) -> None:
        self.tenancy = tenancy
        self.admin_key_hash = admin_key_hash
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def __call__(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        principal = await self.resolve(key)
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        request.state.principal = principal
        return principal

    async def resolve(self, key: str) -> Principal | None:
        digest = hash_key(key)
        if self.admin_key_hash is not None and hmac.compare_digest(digest,
                                                                   self.admin_key_hash):
            return BOOTSTRAP_ADMIN
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            try:
                principal = await self.tenancy.principal(key)
            except (SQLAlchemyError, OSError):
                if cached is not None:  # stale if error: the key store is down, not the key
                    log.warning("key store unreachable; trusting a cached key lookup")
                    return self._unexpired(cached[1])
                raise ServiceUnavailableError(
                    "The key store is unreachable; try again shortly.",
                    headers={"retry-after": "1"}) from None
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()  # bounded: a flood of made-up keys cannot grow it
            self._cache[digest] = (now + self.ttl_s, principal)
        return self._unexpired(principal)

    @staticmethod
    def _unexpired(principal: Principal | None) -> Principal | None:
        if principal is not None and principal.expires_at is not None:
            expires = principal.expires_at
            if (expires if expires.tzinfo else expires.replace(tzinfo=UTC)) <= utcnow():
                return None  # expired while cached
        return principal

    def forget(self) -> None:
        """Drop cached lookups (after an admin changed keys in this process)."""
        self._cache.clear()


async def require_admin(request: Request) -> Principal:
    principal: Principal = request.state.principal
    if not principal.is_admin:
        raise PermissionDeniedError("This endpoint needs an admin key.")
    return principal
