"""The gateway's composition root: `build` makes every service the gateway is made of, once
and explicitly; `create_app` mounts the HTTP edge on them; `lifespan` runs what needs the
event loop (the upstream client, the index, the background chores)."""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from celery import Celery
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from batches import Batches, BatchService, EndpointRule
from conversations import Conversations, Responses
from conversations.events import ResponseEvents
from evals.runs import RunStarter
from evals.scheduler import WatchScheduler
from evals.store import Evals
from evals.watches import EvalWatches
from finetune.jobs import FineTuning
from finetune.serving import adapters_channel
from gateway.api.admin import admin_router
from gateway.api.batches import batches_router
from gateway.api.conversations import conversations_router
from gateway.api.engines import engines_router
from gateway.api.eval_watches import eval_watches_router
from gateway.api.evals import evals_router
from gateway.api.files import files_router
from gateway.api.fine_tuning import fine_tuning_router
from gateway.api.health import health_router, scrape
from gateway.api.inference import ENDPOINTS, add_wire_schemas, handlers, inference_router
from gateway.api.models import models_router
from gateway.api.responses import responses_router
from gateway.api.usage import usage_router
from gateway.api.vector_store_file_batches import file_batches_router
from gateway.api.vector_stores import Ingestion, internal_router, vector_stores_router
from gateway.chores import Chores, load_prices, requeue_orphans
from gateway.console import CONSOLE_PATH, console_app
from gateway.deletion import TenantDeletion
from gateway.http.auth import authenticated
from gateway.http.errors import install_error_handlers
from gateway.http.middleware import BodyLimitMiddleware, InferenceRoutes, RequestIdMiddleware
from gateway.http.sessions import Sessions
from gateway.inference.hooks import (
    AdmissionHook,
    ConformanceHook,
    DriftHook,
    GroundingHook,
    GuardrailHook,
    Hook,
    UsageHook,
)
from gateway.inference.pipeline import Pipeline, parse_request
from gateway.inference.searching import QueryEmbedder
from gateway.inference.spans import TracingMiddleware
from gateway.inference.upstream import Upstream
from gateway.responses.live import LiveStreams
from gateway.responses.protocol import ResponsesRequest
from gateway.responses.service import RESPONSES, ResponsesService
from gateway.routing import Pool, Router, build_affinity, build_prefixes, build_scorers
from gateway.routing.adapters import AdapterLoader
from gateway.routing.flow import FlowControl
from gateway.routing.health import HealthMonitor
from gateway.routing.kv_events import build_kv_event_indexes
from gateway.tasks import enqueue
from guardrails import Guardrails
from llmops.catalog import Catalog
from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Database, upgrade
from observability.budgets import budget_readings
from observability.drift import DriftDetector, DriftWindows
from observability.metrics import GatewayMetrics
from observability.server import MetricsServer
from observability.sources import platform_readings
from observability.tracing import configure_tracing
from observability.watch_metrics import FAMILY as EVAL_WATCHES_FAMILY
from observability.watch_metrics import EvalWatchGauges
from retrieval import open_index
from retrieval.grounding import Retriever
from retrieval.stores import VectorStores
from tenancy.accounting import Accountant, PriceBook
from tenancy.auth import Authenticator
from tenancy.ledger import LedgerPublisher, LedgerWriter
from tenancy.limits import Limiter
from tenancy.tenants import Tenancy
from workers.app import (
    BATCH_QUEUE,
    BATCH_TASK,
    EVAL_QUEUE,
    EVAL_TASK,
    FINETUNE_QUEUE,
    INGEST_QUEUE,
    RESPONSE_TASK,
    make_celery,
)

__all__ = ["Services", "build", "create_app", "services_of"]


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass(frozen=True)
class Services:
    """Everything the gateway is made of (the application's typed state)."""

    settings: Settings
    db: Database
    redis: Redis
    celery: Celery  # a client only: the gateway enqueues, workers work
    catalog: Catalog
    routers: dict[str, Router]
    upstream: Upstream
    tenants: Tenancy
    auth: Authenticator
    sessions: Sessions  # the console's sign-ins
    prices: PriceBook
    publisher: LedgerPublisher
    limiter: Limiter
    accountant: Accountant
    files: Files
    jobs: FineTuning
    adapters: AdapterLoader  # fine-tuned adapters: loaded everywhere, and on demand
    evals: Evals
    watches: EvalWatches
    runs: RunStarter  # every eval run starts here: the API's, a watch's, promotion's
    scheduler: WatchScheduler
    batches: BatchService
    stores: VectorStores
    retriever: Retriever | None  # None without an embedding model
    metrics: GatewayMetrics | None
    drift: DriftDetector | None
    pipeline: Pipeline
    responses: Responses
    conversations: Conversations
    responder: ResponsesService  # POST /v1/responses
    deletion: TenantDeletion  # DELETE /admin/tenants/{id}
    live: LiveStreams  # background responses' streams, followed


def build(settings: Settings) -> Services:
    db = Database(settings.database_url)
    redis = Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                           socket_connect_timeout=settings.redis_timeout_s)
    celery = make_celery(settings)
    catalog = Catalog(settings.models)
    scorers = build_scorers(settings.routing)
    routers = {m.name: Router([Pool.from_config(p, settings.routing) for p in m.pools],
                              scorers, affinity=build_affinity(settings.routing),
                              prefixes=build_prefixes(settings.routing))
               for m in settings.models}
    tenants = Tenancy(db)
    limiter = Limiter(redis, db, settings.redis_prefix, settings.limits)
    watches = EvalWatches(db)
    metrics = None
    if settings.metrics.enabled:
        metrics = GatewayMetrics(settings.metrics, settings.models, routers)
        metrics.add_readings(platform_readings(
            db, redis, celery.conf.broker_transport_options.get("global_keyprefix", ""),
            (FINETUNE_QUEUE, INGEST_QUEUE, EVAL_QUEUE, BATCH_QUEUE)))
        metrics.add_readings(budget_readings(limiter, metrics.tenants))
        metrics.add_collector(EVAL_WATCHES_FAMILY,
                              EvalWatchGauges(watches.enabled_views, metrics.tenants))
    flows = {name: FlowControl(name, router, settings.flow, metrics)
             for name, router in routers.items()} if settings.flow.enabled else {}
    upstream = Upstream(routers, settings.routing, observer=metrics, flows=flows)
    stores = VectorStores(db)
    embedding = settings.embedding_model()
    embedder = catalog.resolve(embedding.name) if embedding is not None else None
    # The platform's own embeddings (drift probes); a search's are its caller's (QueryEmbedder).
    embed = functools.partial(upstream.embed, embedder) if embedder is not None else None
    prices = PriceBook()
    publisher = LedgerPublisher(redis, settings.redis_prefix, settings.ledger.spool_path)
    accountant = Accountant(limiter, publisher, prices)
    retriever = (Retriever(stores, QueryEmbedder(upstream, accountant, embedder),
                           settings.retrieval.score_threshold)
                 if embedder is not None else None)
    drift = None
    if settings.drift.enabled:
        drift = DriftDetector(settings.drift, DriftWindows(redis, settings.redis_prefix,
                                                           settings.drift.window), embed)
        if metrics is not None:
            metrics.registry.register(drift)
    files = Files(db, settings.files.root, settings.files.max_bytes)
    evals = Evals(db)
    runs = RunStarter(evals, files, catalog, settings.evals,
                      lambda run_id: enqueue(celery, EVAL_TASK, [run_id]),
                      stores if retriever is not None else None)
    # A batch's lines are read by the endpoints' own parsers: refused exactly as they would be.
    rules = {e.path: EndpointRule(functools.partial(parse_request, e.schema), e.kind)
             for e in ENDPOINTS}
    rules[RESPONSES.path] = EndpointRule(functools.partial(parse_request, ResponsesRequest),
                                         RESPONSES.kind)
    batches = BatchService(Batches(db), files, catalog, settings.batches, rules,
                           lambda batch_id: enqueue(celery, BATCH_TASK, [batch_id]),
                           settings.max_body_bytes)
    # The request pipeline's concerns, in the order they see a request.
    hooks: list[Hook] = [AdmissionHook(accountant, metrics),
                         GuardrailHook(Guardrails(settings.guardrails)),
                         GroundingHook(retriever), UsageHook()]
    if drift is not None:
        hooks.append(DriftHook(drift))
    hooks.append(ConformanceHook())  # last: it sees what the others made of the answer
    jobs = FineTuning(db)
    adapters = AdapterLoader(settings, jobs, routers, catalog, lambda: upstream.session)
    pipeline = Pipeline(catalog, upstream, hooks, settings.max_body_bytes, adapters.ensure)
    responses = Responses(db, settings.responses.ttl_days)
    conversations = Conversations(db, settings.responses.max_conversation_items)
    # Followers of background responses wait on their events: reads that block need longer.
    events = ResponseEvents(
        Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s + 1.0,
                       socket_connect_timeout=settings.redis_timeout_s),
        settings.redis_prefix, settings.responses.stream_max_events,
        settings.responses.stream_ttl_s, block_s=1.0)
    # A follower waits as long as the worker waits on the engine, then may reconnect.
    live = LiveStreams(events, responses, settings.routing.read_timeout_s)
    responder = ResponsesService(
        pipeline, upstream, catalog, responses, conversations, settings.responses.max_chain,
        settings.max_body_bytes,
        lambda response_id: enqueue(celery, RESPONSE_TASK, [response_id]), live)
    auth = Authenticator(tenants, settings.admin_key_hash(), settings.key_cache_ttl_s)
    deletion = TenantDeletion(
        tenants, auth, jobs=jobs, adapters_root=settings.finetune.adapters_root, evals=evals,
        watches=watches, batches=batches.batches, stores=stores, retriever=retriever,
        files=files, responses=responses, conversations=conversations)
    return Services(
        settings=settings, db=db, redis=redis, celery=celery, catalog=catalog, routers=routers,
        upstream=upstream, tenants=tenants, auth=auth,
        sessions=Sessions(redis, settings.redis_prefix, settings.console.session_ttl_s),
        prices=prices, publisher=publisher, limiter=limiter, accountant=accountant,
        files=files, jobs=jobs, adapters=adapters, evals=evals, watches=watches, runs=runs,
        scheduler=WatchScheduler(watches, runs, tenants, settings.eval_watches.start_timeout_s),
        batches=batches, stores=stores, retriever=retriever, metrics=metrics, drift=drift,
        pipeline=pipeline, responses=responses, conversations=conversations,
        responder=responder, deletion=deletion, live=live)


def create_app(settings: Settings | None = None) -> FastAPI:
    s = build(settings or Settings())
    cfg = s.settings
    principal = authenticated(s.auth, s.sessions if cfg.console.enabled else None)
    app = FastAPI(title="llmops gateway", version="0.1.0",
                  summary="OpenAI-compatible API in front of vLLM engines.",
                  lifespan=functools.partial(lifespan, s), default_response_class=_JSON)
    app.state.services = s
    install_error_handlers(app)
    served = handlers(s.pipeline, principal)

    async def respond(request: Request) -> Response:
        await principal(request)
        return await s.responder.create(request)

    served[RESPONSES.path] = respond
    app.add_middleware(InferenceRoutes, endpoints=served)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes, by_prefix={
        "/v1/files": cfg.files.max_bytes + 64 * 1024,  # + the form's overhead
        "/v1/evals": cfg.evals.max_body_bytes,
        "/internal/": cfg.retrieval.max_points_bytes})
    # Within the request-id middleware: the span gets the id and sees the app's exceptions.
    if configure_tracing("llmops-gateway"):
        app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a 413 carries a request id

    app.include_router(inference_router(served))
    app.include_router(models_router(s.catalog, s.adapters.ensure),
                       dependencies=[Depends(principal)])
    app.include_router(files_router(s.files, principal, functools.partial(_forget_file, s)))
    app.include_router(fine_tuning_router(cfg, s.jobs, s.files, s.celery, principal, s.evals,
                                          s.limiter, s.prices))
    app.include_router(evals_router(s.evals, s.catalog, s.runs, principal))
    app.include_router(eval_watches_router(cfg, s.evals, s.watches, s.runs, principal))
    app.include_router(batches_router(s.batches, principal))
    app.include_router(responses_router(s.responder, s.responses, s.live, s.upstream,
                                        s.catalog, principal, cfg.max_body_bytes))
    app.include_router(conversations_router(s.conversations, principal))
    app.include_router(admin_router(s.db, s.tenants, s.auth, principal, s.prices, s.catalog,
                                    s.drift, s.deletion))
    app.include_router(engines_router(s.routers, s.upstream.flows, principal))
    app.include_router(usage_router(s.db, principal))
    if s.retriever is not None:
        ingestion = Ingestion(cfg, s.stores, s.files, s.celery)
        app.include_router(vector_stores_router(s.stores, ingestion, s.retriever, principal))
        app.include_router(file_batches_router(cfg, s.stores, ingestion, principal))
        app.include_router(internal_router(cfg, s.stores, s.retriever, principal))
    app.include_router(health_router(s.routers, s.metrics if cfg.metrics.port is None else None))
    if cfg.console.enabled:
        app.mount(CONSOLE_PATH, console_app(s.auth, s.sessions, cfg.console))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)
            add_wire_schemas(schema, ResponsesRequest)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def services_of(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


async def _forget_file(s: Services, tenant_id: str, file_id: str) -> None:
    """A deleted file leaves every vector store, chunks included."""
    for store_id in await s.stores.detach_everywhere(tenant_id, file_id):
        if s.retriever is not None:
            await asyncio.to_thread(s.retriever.index.delete_file, store_id, file_id)


@asynccontextmanager
async def lifespan(s: Services, app: FastAPI) -> AsyncIterator[None]:
    cfg = s.settings
    if cfg.auto_migrate:
        await asyncio.to_thread(upgrade, cfg.database_url)
    await s.upstream.start()
    # Precise prefix routing: each chat model's router learns from its engines' KV-cache
    # events what they hold (loading the tokenizers blocks, so off the event loop).
    kv_indexes = await asyncio.to_thread(
        build_kv_event_indexes, cfg.models, {n: r.replicas for n, r in s.routers.items()},
        s.upstream.session, cfg.routing)
    for name, index in kv_indexes.items():
        s.routers[name].prefixes = index
        await index.start()
    if s.retriever is not None:
        r = cfg.retrieval
        key = r.qdrant_api_key.get_secret_value() if r.qdrant_api_key else None
        s.retriever.index = await asyncio.to_thread(
            open_index, r.qdrant_url, r.path, r.dimensions, collection=r.collection,
            api_key=key, timeout_s=r.qdrant_timeout_s)
    # The writer blocks on the stream for block_ms: its reads need a longer timeout.
    writer_redis = Redis.from_url(cfg.redis_url, socket_timeout=cfg.ledger.block_ms / 1000 + 5,
                                  socket_connect_timeout=cfg.redis_timeout_s)
    monitor = HealthMonitor(s.upstream.session, s.routers, s.catalog, cfg.routing)
    # Workers announce adapters here; its reads wait for messages (bounded: see follow).
    notices = Redis.from_url(cfg.redis_url, socket_timeout=cfg.redis_timeout_s + 5,
                             socket_connect_timeout=cfg.redis_timeout_s,
                             health_check_interval=15)
    chores = Chores()
    chores.every(10.0, lambda: load_prices(s.db, s.prices))
    chores.every(5.0, s.publisher.drain_spool)
    if cfg.ledger.writer:
        chores.start(LedgerWriter(writer_redis, s.db, cfg.redis_prefix, cfg.ledger).run())
    await monitor.start()
    if s.drift is not None:
        await s.drift.start()
    metrics_server = None
    if s.metrics is not None:
        await s.metrics.start()
        if cfg.metrics.port is not None:
            metrics_server = MetricsServer(cfg.host, cfg.metrics.port,
                                           functools.partial(scrape, s.metrics))
            await metrics_server.start()
    chores.start(s.adapters.run())
    chores.start(s.adapters.follow(notices, adapters_channel(cfg.redis_prefix)))
    chores.every(600.0, s.responses.purge_expired)
    chores.every(10.0, lambda: requeue_orphans(s.jobs, s.evals, s.batches.batches, s.celery,
                                                     s.redis))
    if cfg.eval_watches.scheduler:
        chores.every(cfg.eval_watches.poll_s, s.scheduler.tick)
    # Long-lived start-up objects leave the collector's view: fewer, shorter pauses.
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if metrics_server is not None:
            await metrics_server.stop()
        if s.metrics is not None:
            await s.metrics.stop()
        await monitor.stop()
        for index in kv_indexes.values():
            await index.stop()
        if s.drift is not None:
            await s.drift.stop()
        await s.accountant.drain()  # every finished request's record is published
        await s.responses.drain()  # every finished response is stored
        await s.conversations.drain()
        if s.retriever is not None:
            await asyncio.to_thread(s.retriever.index.close)
        await chores.stop()
        await writer_redis.aclose()
        await notices.aclose()
        await s.live.events.redis.aclose()
        await s.redis.aclose()
        await s.db.close()
        await s.upstream.close()
