"""Stand-ins for a vLLM engine at the HTTP boundary, for tests of the gateway's own behaviour."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="")


@contextlib.asynccontextmanager
async def serve_engine(handler: web.Handler, path: str = "/v1/chat/completions"
                       ) -> AsyncIterator[str]:
    """Serve `handler` at `path` (and a passing /health) on a free local port; yields the
    base URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    app.router.add_get("/health", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
