"""API key check for `/v1/*`: the gateway keeps only the key's SHA-256 and compares digests
in constant time."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

from gateway.errors import AuthenticationError

__all__ = ["KeyVerifier"]


class KeyVerifier:
    def __init__(self, digest: bytes | None) -> None:
        self._digest = digest  # None: authentication switched off by configuration

    async def __call__(self, request: Request) -> None:
        # async: FastAPI would run a plain function in a thread pool, a hop per request
        if self._digest is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        presented = hashlib.sha256(key.strip().encode()).digest()
        if not hmac.compare_digest(presented, self._digest):
            raise AuthenticationError("Incorrect API key provided.")
