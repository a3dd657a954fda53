"""Authentication as the routes declare it: a FastAPI dependency that resolves the caller's key
(`tenancy.auth`) and keeps the principal in `request.state.principal` for what follows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request

from llmops.errors import PermissionDeniedError
from tenancy import ON_BEHALF_HEADER, Principal
from tenancy.auth import Authenticator

__all__ = ["authenticated", "require_admin"]


def authenticated(auth: Authenticator) -> Callable[[Request], Awaitable[Principal]]:
    """The dependency of every authenticated route: the caller's principal, or a 401."""
    async def principal(request: Request) -> Principal:
        found = await auth.authenticate(request.headers.get("authorization"),
                                        request.headers.get(ON_BEHALF_HEADER))
        request.state.principal = found
        return found
    return principal


async def require_admin(request: Request) -> Principal:
    principal: Principal = request.state.principal
    if not principal.is_admin:
        raise PermissionDeniedError("This endpoint needs an admin key.")
    return principal
