"""The gateway's FastAPI application: OpenAI-compatible routes over the routing and proxy
layers, health endpoints, and the lifespan that owns the pooled upstream client."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import aiohttp
import orjson
from celery import Celery
from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from redis.asyncio import Redis
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from evals.store import Evals
from evals.watches import EvalWatches
from finetune.jobs import FineTuning
from gateway.api.admin import admin_router
from gateway.api.eval_watches import eval_watches_router
from gateway.api.evals import evals_router
from gateway.api.files import files_router
from gateway.api.fine_tuning import fine_tuning_router
from gateway.api.vector_stores import internal_router, vector_stores_router
from gateway.eval_scheduler import RunStarter, WatchScheduler
from gateway.http.auth import authenticated
from gateway.http.errors import install_error_handlers
from gateway.http.middleware import BodyLimitMiddleware, InferenceRoutes, RequestIdMiddleware
from gateway.inference.accounting import Accountant, PriceBook
from gateway.inference.grounding import Retriever
from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.inference.proxy import Endpoint, Proxy
from gateway.inference.spans import TracingMiddleware
from gateway.routing import Pool, Router, build_affinity, build_scorers
from gateway.routing.adapters import AdapterLoader
from gateway.routing.health import HealthMonitor
from gateway.tasks import enqueue
from llmops.catalog import Catalog, CatalogEntry
from llmops.errors import ModelNotFoundError, error_body
from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Database, ModelPrice, upgrade
from observability.budgets import budget_readings
from observability.drift import DriftDetector, DriftWindows
from observability.metrics import CONTENT_TYPE, GatewayMetrics
from observability.server import MetricsServer
from observability.sources import celery_queue_lengths, platform_readings
from observability.tracing import configure_tracing
from observability.watch_metrics import FAMILY as EVAL_WATCHES_FAMILY
from observability.watch_metrics import EvalWatchGauges
from retrieval import open_index
from retrieval.stores import VectorStores
from tenancy.auth import Authenticator
from tenancy.ledger import LedgerPublisher, LedgerWriter
from tenancy.limits import Limiter
from tenancy.pricing import Price
from tenancy.tenants import Principal, Tenancy
from workers.app import (
    EVAL_QUEUE,
    EVAL_TASK,
    FINETUNE_QUEUE,
    FINETUNE_TASK,
    INGEST_QUEUE,
    make_celery,
)

__all__ = ["create_app", "requeue_orphans"]

log = logging.getLogger(__name__)
_CHORES_STOP_S = 5.0

CHAT = Endpoint("/v1/chat/completions", ChatCompletionRequest, "chat")
COMPLETIONS = Endpoint("/v1/completions", CompletionRequest, "chat")
EMBEDDINGS = Endpoint("/v1/embeddings", EmbeddingRequest, "embedding")


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def _every(period: float, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        try:
            await job()
        except Exception as exc:  # a chore must outlive a failing round
            log.warning("background chore failed: %s", exc)
        await asyncio.sleep(period)


async def _load_prices(db: Database, prices: PriceBook) -> None:
    async with db.session() as session:
        rows = await session.scalars(select(ModelPrice))
        prices.prices = {r.model: Price(float(r.input_per_mtok), float(r.output_per_mtok))
                         for r in rows}


async def requeue_orphans(jobs: FineTuning, evals: Evals, celery: Celery, redis: Redis,
                          unclaimed_for: timedelta = timedelta(minutes=1)) -> None:
    """Fine-tuning jobs and eval runs no worker holds go back on their queue: a worker died
    (its lease expired; a run resumes where it stopped), or the message was lost before any
    worker claimed it (a worker that died between taking and claiming it; a gateway that died
    between writing the row and sending it). They are sent while their queue is empty only:
    a message still waiting is not copied again and again. The lease lets one worker take
    each, so a copy of a message still held somewhere is harmless."""
    prefix = celery.conf.broker_transport_options.get("global_keyprefix", "")
    waiting = await celery_queue_lengths(redis, prefix, (FINETUNE_QUEUE, EVAL_QUEUE))
    lost: tuple[tuple[str, str, Callable[[timedelta], Awaitable[list[str]]]], ...] = (
        (FINETUNE_QUEUE, FINETUNE_TASK, jobs.orphaned), (EVAL_QUEUE, EVAL_TASK, evals.orphaned))
    for queue, task, orphaned in lost:
        if waiting[queue]:
            continue
        for item_id in await orphaned(unclaimed_for):
            log.warning("%s %s has no worker; queueing it again", task, item_id)
            await enqueue(celery, task, [item_id])


def _scrape(metrics: GatewayMetrics, authorization: str | None) -> tuple[int, bytes, str]:
    """One scrape of `/metrics`, on the API's port or on a port of its own."""
    if not metrics.authorized(authorization):
        return 401, error_body("Scraping metrics needs the metrics token.",
                               "invalid_request_error", code="invalid_api_key"), \
            "application/json"
    return 200, metrics.exposition(), CONTENT_TYPE


def _body(schema: type[Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    db = Database(settings.database_url)
    redis = Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                           socket_connect_timeout=settings.redis_timeout_s)
    tenants = Tenancy(db)
    auth = Authenticator(tenants, settings.admin_key_hash(), settings.key_cache_ttl_s)
    prices = PriceBook()
    publisher = LedgerPublisher(redis, settings.redis_prefix, settings.ledger.spool_path)
    files = Files(db, settings.files.root, settings.files.max_bytes)
    jobs = FineTuning(db)
    evals = Evals(db)
    watches = EvalWatches(db)
    celery = make_celery(settings)  # a client only: the gateway enqueues, workers train
    catalog = Catalog(settings.models)
    scorers = build_scorers(settings.routing)
    routers = {
        m.name: Router([Pool.from_config(p, settings.routing) for p in m.pools], scorers,
                       affinity=build_affinity(settings.routing))
        for m in settings.models
    }
    limiter = Limiter(redis, db, settings.redis_prefix, settings.limits)
    metrics = None
    if settings.metrics.enabled:
        metrics = GatewayMetrics(settings.metrics, settings.models, routers)
        metrics.add_readings(platform_readings(
            db, redis, celery.conf.broker_transport_options.get("global_keyprefix", ""),
            (FINETUNE_QUEUE, INGEST_QUEUE, EVAL_QUEUE)))
        metrics.add_readings(budget_readings(limiter, metrics.tenants))
        metrics.add_collector(EVAL_WATCHES_FAMILY,
                              EvalWatchGauges(watches.enabled_views, metrics.tenants))
    embedding = settings.embedding_model()
    stores = VectorStores(db)
    retriever = embed = None
    if embedding is not None:
        async def embed(texts: list[str]) -> list[list[float]]:
            return await app.state.proxy.embed(embedding.name, texts)  # type: ignore[no-any-return]

        retriever = Retriever(stores, embed, settings.retrieval.score_threshold)
    drift = None
    if settings.drift.enabled:
        drift = DriftDetector(settings.drift, DriftWindows(redis, settings.redis_prefix,
                                                           settings.drift.window), embed)
        if metrics is not None:
            metrics.registry.register(drift)
    accountant = Accountant(limiter, publisher, prices, observer=metrics, drift=drift)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=settings.routing.max_connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        if settings.auto_migrate:
            await asyncio.to_thread(upgrade, settings.database_url)
        # The writer blocks on the stream for block_ms: its reads need a longer timeout.
        writer_redis = Redis.from_url(settings.redis_url,
                                      socket_timeout=settings.ledger.block_ms / 1000 + 5,
                                      socket_connect_timeout=settings.redis_timeout_s)
        chores = [_every(10.0, lambda: _load_prices(db, prices)),
                  _every(5.0, publisher.drain_spool)]
        if settings.ledger.writer:
            writer = LedgerWriter(writer_redis, db, settings.redis_prefix, settings.ledger)
            chores.append(writer.run())
        tasks = [asyncio.create_task(c) for c in chores]
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        ) as session:
            monitor = HealthMonitor(session, routers, catalog, settings.routing)
            app.state.proxy = Proxy(settings, catalog, routers, session, accountant)
            app.state.monitor = monitor
            if retriever is not None:
                cfg = settings.retrieval
                key = cfg.qdrant_api_key.get_secret_value() if cfg.qdrant_api_key else None
                retriever.index = await asyncio.to_thread(
                    open_index, cfg.qdrant_url, cfg.path, cfg.dimensions,
                    collection=cfg.collection, api_key=key, timeout_s=cfg.qdrant_timeout_s)
                app.state.proxy.retriever = retriever
            await monitor.start()
            if drift is not None:
                await drift.start()
            metrics_server = None
            if metrics is not None:
                await metrics.start()
                if settings.metrics.port is not None:
                    metrics_server = MetricsServer(settings.host, settings.metrics.port,
                                                   functools.partial(_scrape, metrics))
                    await metrics_server.start()
            loader = AdapterLoader(settings, jobs, routers, catalog, session)
            tasks += [asyncio.create_task(_every(3.0, loader.reconcile)),
                      asyncio.create_task(_every(10.0, lambda: requeue_orphans(
                          jobs, evals, celery, redis)))]
            if settings.eval_watches.scheduler:
                tasks.append(asyncio.create_task(_every(settings.eval_watches.poll_s,
                                                        scheduler.tick)))
            # Long-lived start-up objects leave the collector's view: fewer, shorter pauses.
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                if metrics_server is not None:
                    await metrics_server.stop()
                if metrics is not None:
                    await metrics.stop()
                await monitor.stop()
                if drift is not None:
                    await drift.stop()
                await accountant.drain()  # every finished request's record is published
                if retriever is not None:
                    await asyncio.to_thread(retriever.index.close)
                for task in tasks:
                    task.cancel()
                # Bounded: redis-py can swallow a cancellation that lands in a blocking read
                # (the ledger writer's XREADGROUP), which hung shutdown until SIGKILL. What
                # the writer had not acknowledged stays in the stream for the next writer.
                _, stuck = await asyncio.wait(tasks, timeout=_CHORES_STOP_S)
                for task in stuck:
                    log.warning("background chore %s did not stop in %.0f s; leaving it",
                                task.get_coro(), _CHORES_STOP_S)
                await writer_redis.aclose()
                await redis.aclose()
                await db.close()

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
    app.state.celery = celery  # the broker client every route enqueues with
    install_error_handlers(app)

    principal = authenticated(auth)

    def inference(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            await principal(request)
            return await app.state.proxy.forward(request, endpoint)  # type: ignore[no-any-return]
        return handle

    app.add_middleware(InferenceRoutes, endpoints={
        e.path: inference(e) for e in (CHAT, COMPLETIONS, EMBEDDINGS)})
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, by_prefix={
        "/v1/files": settings.files.max_bytes + 64 * 1024,  # + the form's overhead
        "/v1/evals": settings.evals.max_body_bytes,
        "/internal/": settings.retrieval.max_points_bytes})
    # Within the request-id middleware: the span gets the id and sees the app's exceptions.
    if configure_tracing("llmops-gateway"):
        app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a 413 carries a request id

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(principal)])

    def model_item(e: CatalogEntry) -> dict[str, Any]:
        item: dict[str, Any] = {"id": e.name, "object": "model", "created": e.created,
                                "owned_by": e.base.owned_by}
        if e.adapter is not None:
            item["parent"] = e.base.name
            item.update(catalog.details.get(e.name, {}))
        return item

    def visible(who: Principal, e: CatalogEntry) -> bool:
        return who.may_use(e.name) and catalog.visible_to(e, who.tenant_id, who.is_admin,
                                                          who.delegated)

    @v1.get("/models", tags=["models"])
    async def list_models(request: Request) -> Response:
        who: Principal = request.state.principal
        data = [model_item(e) for e in catalog.entries() if visible(who, e)]
        return _JSON({"object": "list", "data": data})

    @v1.get("/models/{model:path}", tags=["models"])
    async def retrieve_model(request: Request, model: str) -> Response:
        entry = catalog.resolve(model)
        if entry is None or not visible(request.state.principal, entry):
            raise ModelNotFoundError(model)
        return _JSON(model_item(entry))

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
    async def forget_file(tenant_id: str, file_id: str) -> None:
        """A deleted file leaves every vector store, chunks included."""
        for store_id in await stores.detach_everywhere(tenant_id, file_id):
            if retriever is not None:
                await asyncio.to_thread(retriever.index.delete_file, store_id, file_id)

    app.include_router(files_router(files, auth, forget_file))
    app.include_router(fine_tuning_router(settings, jobs, files, celery, auth, evals))
    app.include_router(evals_router(settings, evals, files, catalog, celery, auth,
                                    stores if retriever is not None else None))
    # Watches start their runs through the route above, in process (gateway.eval_scheduler).
    starter = RunStarter(app, settings.bootstrap_key(), settings.eval_watches.start_timeout_s)
    scheduler = WatchScheduler(watches, starter)
    app.include_router(eval_watches_router(settings, evals, watches, starter, auth))
    app.include_router(admin_router(db, tenants, auth, prices, catalog, drift))
    if retriever is not None:
        app.include_router(vector_stores_router(settings, stores, files, retriever, celery,
                                                auth))
        app.include_router(internal_router(settings, stores, retriever, auth))

    if metrics is not None and settings.metrics.port is None:
        @app.get("/metrics", include_in_schema=False)
        async def prometheus_metrics(request: Request) -> Response:
            status, body, content_type = _scrape(metrics, request.headers.get("authorization"))
            return Response(body, status_code=status, headers={"content-type": content_type})

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
