"""Liveness, readiness and the Prometheus scrape (when metrics share the API's port)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.routing import Router
from llmops.errors import error_body
from observability.metrics import CONTENT_TYPE, GatewayMetrics

__all__ = ["health_router", "scrape"]


def scrape(metrics: GatewayMetrics, authorization: str | None) -> tuple[int, bytes, str]:
    """One scrape of `/metrics`, on the API's port or on a port of its own."""
    if not metrics.authorized(authorization):
        return 401, error_body("Scraping metrics needs the metrics token.",
                               "invalid_request_error", code="invalid_api_key"), \
            "application/json"
    return 200, metrics.exposition(), CONTENT_TYPE


def health_router(routers: dict[str, Router], metrics: GatewayMetrics | None) -> APIRouter:
    """`metrics`: served here at `/metrics` when given (None: not served, or on its own
    port)."""
    router = APIRouter()

    @router.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @router.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        """Ready when every configured model has at least one healthy replica."""
        models = {name: {"healthy_replicas": sum(r.available for r in model.replicas),
                         "replicas": len(model.replicas)}
                  for name, model in routers.items()}
        ready = all(m["healthy_replicas"] > 0 for m in models.values())
        return Response(orjson.dumps({"status": "ready" if ready else "unavailable",
                                      "models": models}),
                        status_code=200 if ready else 503, media_type="application/json")

    if metrics is not None:
        @router.get("/metrics", include_in_schema=False)
        async def prometheus_metrics(request: Request) -> Response:
            status, body, content_type = scrape(metrics, request.headers.get("authorization"))
            return Response(body, status_code=status, headers={"content-type": content_type})

    return router
