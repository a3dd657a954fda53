"""Authentication as the routes declare it: a FastAPI dependency that resolves the caller's key
(`tenancy.auth`) and keeps the principal in `request.state.principal` for what follows.

A request without an `Authorization` header may carry the console's session cookie instead
(`gateway.http.sessions`): it is served as the key that signed in, and a state-changing request
must echo the session's CSRF token. Both paths end in the same principal, so every rule of the
API applies to the console unchanged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request

from gateway.http.sessions import CSRF_HEADER, SAFE_METHODS, SESSION_COOKIE, Sessions
from llmops.errors import AuthenticationError, PermissionDeniedError
from tenancy import ON_BEHALF_HEADER, Principal
from tenancy.auth import Authenticator

__all__ = ["Authenticated", "authenticated", "require_admin"]

# The dependency that authenticates a route's caller (built once, in the composition root).
Authenticated = Callable[[Request], Awaitable[Principal]]


def authenticated(auth: Authenticator, sessions: Sessions | None = None) -> Authenticated:
    """The dependency of every authenticated route: the caller's principal, or a 401."""
    async def principal(request: Request) -> Principal:
        header = request.headers.get("authorization")
        if header is None and sessions is not None and SESSION_COOKIE in request.cookies:
            found = await _session_principal(request, auth, sessions)
        else:
            found = await auth.authenticate(header, request.headers.get(ON_BEHALF_HEADER))
        request.state.principal = found
        return found
    return principal


async def _session_principal(request: Request, auth: Authenticator, sessions: Sessions
                             ) -> Principal:
    session = await sessions.of(request)
    if session is None:
        raise AuthenticationError("Your console session has ended; sign in again.")
    if request.method not in SAFE_METHODS and not session.csrf_matches(
            request.headers.get(CSRF_HEADER)):
        raise PermissionDeniedError(f"A console request that changes something must send "
                                    f"the session's CSRF token in {CSRF_HEADER}.")
    found = await auth.by_digest(session.key_digest)
    if found is None:
        raise AuthenticationError("The key this session signed in with is no longer usable.")
    acting_for = request.headers.get(ON_BEHALF_HEADER)
    return found if acting_for is None else await auth.on_behalf(found, acting_for)


async def require_admin(request: Request) -> Principal:
    principal: Principal = request.state.principal
    if not principal.is_admin:
        raise PermissionDeniedError("This endpoint needs an admin key.")
    return principal
