"""The gateway's FastAPI application: OpenAI-compatible routes over the routing and proxy
layers, health endpoints, and the lifespan that owns the pooled upstream client."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import KeyVerifier
from gateway.errors import install_error_handlers
from gateway.middleware import RequestIdMiddleware
from gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.proxy import Endpoint, Proxy
from gateway.routing import Pool, Router, build_scorers
from gateway.routing.health import HealthMonitor
from llmops.catalog import Catalog
from llmops.settings import Settings

__all__ = ["create_app"]

CHAT = Endpoint("/v1/chat/completions", ChatCompletionRequest, "chat")
COMPLETIONS = Endpoint("/v1/completions", CompletionRequest, "chat")
EMBEDDINGS = Endpoint("/v1/embeddings", EmbeddingRequest, "embedding")


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _body(schema: type[Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    catalog = Catalog(settings.models)
    scorers = build_scorers(settings.routing)
    routers = {
        m.name: Router([Pool.from_config(p, settings.routing) for p in m.pools], scorers)
        for m in settings.models
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=settings.routing.max_connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        ) as session:
            monitor = HealthMonitor(session, routers, catalog, settings.routing)
            app.state.proxy = Proxy(settings, catalog, routers, session)
            app.state.monitor = monitor
            await monitor.start()
            # Long-lived start-up objects leave the collector's view: fewer, shorter pauses.
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                await monitor.stop()

    app = FastAPI(
        title="llmops gateway",
        version="0.1.0",
        summary="OpenAI-compatible API in front of vLLM engines.",
        lifespan=lifespan,
        default_response_class=_JSON,
    )
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.routers = routers
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(KeyVerifier(settings.api_key_digest()))])

    @v1.get("/models", tags=["models"])
    async def list_models() -> Response:
        data = []
        for e in catalog.entries():
            item: dict[str, Any] = {"id": e.name, "object": "model", "created": e.created,
                                    "owned_by": e.base.owned_by}
            if e.adapter is not None:
                item["parent"] = e.base.name
            data.append(item)
        return _JSON({"object": "list", "data": data})

    @v1.post("/chat/completions", tags=["inference"], openapi_extra=_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await request.app.state.proxy.forward(request, CHAT)  # type: ignore[no-any-return]

    @v1.post("/completions", tags=["inference"], openapi_extra=_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await request.app.state.proxy.forward(request, COMPLETIONS)  # type: ignore[no-any-return]

    @v1.post("/embeddings", tags=["inference"], openapi_extra=_body(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        return await request.app.state.proxy.forward(request, EMBEDDINGS)  # type: ignore[no-any-return]

    app.include_router(v1)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        """The process is alive."""
        return _JSON({"status": "ok"})

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        """Ready when every configured model has at least one healthy replica."""
        models = {
            name: {"healthy_replicas": sum(r.available for r in router.replicas),
                   "replicas": len(router.replicas)}
            for name, router in routers.items()
        }
        ready = all(m["healthy_replicas"] > 0 for m in models.values())
        return _JSON({"status": "ready" if ready else "unavailable", "models": models},
                     status_code=200 if ready else 503)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)
            _, defs = models_json_schema(
                [(m, "validation") for m in (ChatCompletionRequest, CompletionRequest,
                                             EmbeddingRequest)],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
