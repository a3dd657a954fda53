"""A metrics endpoint on a port of its own (`GET /metrics`), served by aiohttp in the running
event loop, for deployments that keep scrapes off the API's port."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from aiohttp import web
from pydantic import SecretStr

__all__ = ["MetricsServer", "Scrape", "authorized"]

# (the request's Authorization header) -> (status, body, content type)
Scrape = Callable[[str | None], tuple[int, bytes, str]]


def authorized(token: SecretStr | None, authorization: str | None) -> bool:
    """Whether a scrape with this `Authorization` header may read metrics guarded by `token`
    (None: anyone may)."""
    if token is None:
        return True
    scheme, _, credentials = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode(), token.get_secret_value().encode())


class MetricsServer:
    def __init__(self, host: str, port: int, scrape: Scrape) -> None:
        self.host = host
        self.port = port
        self.scrape = scrape
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None)

    async def _handle(self, request: web.Request) -> web.Response:
        status, body, content_type = self.scrape(request.headers.get("Authorization"))
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
