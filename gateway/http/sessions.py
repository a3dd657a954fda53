"""Browser sessions: the console signs in with an API key once, then carries an opaque session
cookie. The session lives in Redis under the SHA-256 of its token (a leaked Redis dump holds no
usable cookie), keeps the digest of the key it stands for (never the key), and ends at its
expiry or at sign-out. Requests made with it are served as that key, so a revoked key (or a
rotated bootstrap key) ends its sessions at once.

A cookie rides along on every request to this site, so every state-changing request made with
one must also echo the session's CSRF token in `x-csrf-token` (the synchronizer-token pattern);
`SameSite=Strict` keeps other sites' pages from sending the cookie in the first place."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import HTTPConnection

from llmops.errors import ServiceUnavailableError

__all__ = ["CSRF_HEADER", "SAFE_METHODS", "SESSION_COOKIE", "Session", "Sessions"]

SESSION_COOKIE = "llmops_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TOKEN_MAX = 128  # a longer cookie is not ours: refused before hashing


@dataclass(frozen=True)
class Session:
    key_digest: str  # SHA-256 hex of the API key that signed in, as the key store keeps it
    csrf: str
    expires_at: float  # epoch seconds

    def csrf_matches(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(sent.encode(), self.csrf.encode())


class Sessions:
    """Server-side sessions in Redis, each with a fixed lifetime from sign-in."""

    def __init__(self, redis: Redis, prefix: str, ttl_s: float) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:console:session:"
        self.ttl_s = ttl_s

    def _key(self, token: str) -> str:
        return self.prefix + hashlib.sha256(token.encode()).hexdigest()

    async def start(self, key_digest: str) -> tuple[str, Session]:
        """A new session for the key with this digest: its cookie token and itself."""
        token = secrets.token_urlsafe(32)
        session = Session(key_digest, secrets.token_urlsafe(32), time.time() + self.ttl_s)
        await self.redis.set(self._key(token), orjson.dumps(session.__dict__),
                             px=int(self.ttl_s * 1000))
        return token, session

    async def find(self, token: str | None) -> Session | None:
        if not token or len(token) > _TOKEN_MAX:
            return None
        try:
            raw = await self.redis.get(self._key(token))
        except (RedisError, OSError):
            raise ServiceUnavailableError("The session store is unreachable; try again shortly.",
                                          headers={"retry-after": "1"}) from None
        if raw is None:
            return None
        session = Session(**orjson.loads(raw))
        return session if session.expires_at > time.time() else None

    async def end(self, token: str | None) -> None:
        if token and len(token) <= _TOKEN_MAX:
            await self.redis.delete(self._key(token))

    async def of(self, connection: HTTPConnection) -> Session | None:
        return await self.find(connection.cookies.get(SESSION_COOKIE))
