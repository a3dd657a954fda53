"""The gateway's Prometheus metrics: families and buckets, bounded tenant labels, figures read
in the background, and who may scrape them (on the API's port or on a port of its own)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis.asyncio import Redis

import observability.metrics
from gateway.app import create_app
from gateway.inference.context import RequestContext
from gateway.inference.hooks import AdmissionHook
from gateway.inference.protocol import ChatCompletionRequest
from gateway.routing import Pool, Router, build_scorers
from llmops.catalog import CatalogEntry
from llmops.cli.stack import free_port
from llmops.settings import MetricsConfig, ModelConfig, RoutingConfig, Settings
from observability.metrics import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, GatewayMetrics, Reading
from tenancy.accounting import Accountant, PriceBook
from tenancy.ledger import UsageEvent
from tenancy.limits import Admission, LimitExceededError
from tenancy.tenants import Limits, Principal
from tests.standin import serve_engine
from workers.app import FINETUNE_TASK, make_celery

CHAT = ModelConfig(name="chat", kind="chat", pools=[
    {"device": "gpu", "urls": ["http://gpu-0:8000", "http://gpu-1:8000"], "priority": 10},
    {"device": "cpu", "urls": ["http://cpu-0:8000"]}])
GPU, CPU = CHAT.pools


def gateway_metrics(**config: object) -> tuple[GatewayMetrics, dict[str, Router]]:
    routing = RoutingConfig()
    routers = {"chat": Router([Pool.from_config(p, routing) for p in CHAT.pools],
                              build_scorers(routing))}
    return GatewayMetrics(MetricsConfig.model_validate(config), [CHAT], routers), routers


def event(tenant: str = "ten_a", status: int = 200, device: str | None = "cpu",
          latency_ms: float = 1200.0, ttft_ms: float | None = None, prompt: int = 10,
          completion: int = 21, cost: float = 0.002) -> UsageEvent:
    return UsageEvent(request_id=uuid.uuid4().hex, tenant_id=tenant, key_id="key_a",
                      endpoint="/v1/chat/completions", model="chat", status=status,
                      prompt_tokens=prompt, completion_tokens=completion, latency_ms=latency_ms,
                      ttft_ms=ttft_ms, pool=device, cost_usd=cost)


def scrape(metrics: GatewayMetrics) -> dict[str, list[Sample]]:
    """Samples by family, from the text exposition as Prometheus would parse it."""
    text = metrics.exposition().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    [match] = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return match


def types(metrics: GatewayMetrics) -> dict[str, str]:
    text = metrics.exposition().decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_families_follow_prometheus_conventions() -> None:
    metrics, _ = gateway_metrics(tenants=["ten_a"])
    metrics.admitted("chat")
    metrics.dispatched("chat", CPU, "fallback")  # a GPU pool exists: a fallback
    metrics.finished(event(ttft_ms=200.0), "chat", CPU, admitted=True)
    metrics.finished(event(status=404, device=None, prompt=0, completion=0, cost=0.0),
                     None, None, admitted=False)
    metrics.rejected("rate_limit", "ten_a")
    metrics.retried("chat")
    assert {
        "llmops_requests": "counter",
        "llmops_request_duration_seconds": "histogram",
        "llmops_time_to_first_token_seconds": "histogram",
        "llmops_time_per_output_token_seconds": "histogram",
        "llmops_tokens": "counter",
        "llmops_cost_usd": "counter",
        "llmops_requests_in_flight": "gauge",
        "llmops_rejections": "counter",
        "llmops_upstream_retries": "counter",
        "llmops_fallbacks": "counter",
        "llmops_backend_healthy": "gauge",
        "llmops_circuit_state": "gauge",
        "llmops_metrics_collect_errors": "counter",
    }.items() <= types(metrics).items()

    s = scrape(metrics)
    requests = s["llmops_requests"]
    assert value(requests, "llmops_requests_total", model="chat", pool="fallback1",
                 device="cpu", status_class="2xx", tenant="ten_a",
                 endpoint="/v1/chat/completions") == 1
    # A name that did not resolve is never a label value of its own.
    assert value(requests, "llmops_requests_total", model="unknown", pool="none",
                 device="none", status_class="4xx") == 1
    # Latency only for requests that reached a backend; TTFT and TPOT only for streams.
    duration = s["llmops_request_duration_seconds"]
    assert value(duration, "llmops_request_duration_seconds_count", model="chat") == 1
    assert value(duration, "llmops_request_duration_seconds_sum", model="chat") == 1.2
    assert value(s["llmops_time_to_first_token_seconds"],
                 "llmops_time_to_first_token_seconds_sum", device="cpu") == 0.2
    assert value(s["llmops_time_per_output_token_seconds"],  # (1.2 s - 0.2 s) / 20 tokens
                 "llmops_time_per_output_token_seconds_sum") == pytest.approx(0.05)
    assert value(s["llmops_tokens"], "llmops_tokens_total", model="chat", kind="prompt") == 10
    assert value(s["llmops_tokens"], "llmops_tokens_total", model="chat",
                 kind="completion") == 21
    assert value(s["llmops_cost_usd"], "llmops_cost_usd_total", model="chat",
                 tenant="ten_a") == 0.002
    assert value(s["llmops_requests_in_flight"], "llmops_requests_in_flight") == 0
    assert value(s["llmops_rejections"], "llmops_rejections_total", reason="rate_limit") == 1
    assert value(s["llmops_upstream_retries"], "llmops_upstream_retries_total") == 1
    assert value(s["llmops_fallbacks"], "llmops_fallbacks_total", from_device="gpu",
                 to_device="cpu") == 1
    assert all(not n.endswith("_total") and not n.startswith("llmops_llmops") for n in s)


def test_histogram_buckets_span_milliseconds_to_minutes() -> None:
    metrics, _ = gateway_metrics()
    metrics.finished(event(ttft_ms=50.0), "chat", GPU, admitted=False)
    s = scrape(metrics)
    for family, buckets in (("llmops_request_duration_seconds", E2E_BUCKETS),
                            ("llmops_time_to_first_token_seconds", TTFT_BUCKETS),
                            ("llmops_time_per_output_token_seconds", TPOT_BUCKETS)):
        bounds = [float(x.labels["le"]) for x in s[family] if x.name.endswith("_bucket")]
        assert bounds == [*buckets, float("inf")]
        assert bounds[0] <= 0.005 and bounds == sorted(bounds)
    assert E2E_BUCKETS[-1] >= 600 and TTFT_BUCKETS[-1] >= 60 and TPOT_BUCKETS[0] <= 0.001
    # One series per model and device: tenants and endpoints stay out of histograms.
    assert {frozenset(x.labels) - {"le"} for x in s["llmops_request_duration_seconds"]} == {
        frozenset({"model", "device"})}


def test_backend_health_and_circuit_state_are_read_at_scrape_time() -> None:
    metrics, routers = gateway_metrics()
    healthy = scrape(metrics)["llmops_backend_healthy"]
    assert {(x.labels["pool"], x.labels["replica"], x.value) for x in healthy} == {
        ("primary", "http://gpu-0:8000", 1.0), ("primary", "http://gpu-1:8000", 1.0),
        ("fallback1", "http://cpu-0:8000", 1.0)}
    gpu0 = routers["chat"].replicas[0]
    gpu0.healthy = False
    gpu0.circuit.trip()
    s = scrape(metrics)
    assert value(s["llmops_backend_healthy"], "llmops_backend_healthy",
                 replica="http://gpu-0:8000") == 0
    circuit = {x.labels["state"]: x.value for x in s["llmops_circuit_state"]
               if x.labels["replica"] == "http://gpu-0:8000"}
    assert circuit == {"closed": 0, "open": 1, "half_open": 0}


async def test_a_flood_of_tenants_yields_at_most_top_n_plus_other() -> None:
    top = 5
    metrics, _ = gateway_metrics(top_tenants=top, tenants=["ten_vip"])
    heavy = ["ten_h0", "ten_h1", "ten_h2"]
    for i in range(1000):
        metrics.finished(event(tenant=f"ten_flood{i}"), "chat", CPU, admitted=False)
        if i % 10 == 0:
            for tenant in heavy:
                metrics.finished(event(tenant=tenant), "chat", CPU, admitted=False)
        if i % 100 == 99:
            await metrics.refresh()  # where the background task hands out labels
    metrics.finished(event(tenant="ten_vip"), "chat", CPU, admitted=False)
    samples = scrape(metrics)["llmops_requests"]
    tenants = {x.labels["tenant"] for x in samples if x.name == "llmops_requests_total"}
    assert len(tenants - {"ten_vip"}) <= top + 1
    assert {"other", "ten_vip", *heavy} <= tenants  # the busiest won their slots
    # Nothing is lost by grouping.
    assert sum(x.value for x in samples if x.name == "llmops_requests_total") == 1000 + 300 + 1


class Limiter:
    """Admits, or refuses as the real one does, without Redis."""

    def __init__(self, refuse: str | None) -> None:
        self.refuse = refuse

    async def admit(self, who: Principal, tokens: int, cost: float) -> Admission:
        if self.refuse:
            raise LimitExceededError("Slow down.", reason=self.refuse)
        return Admission()

    async def settle(self, admission: Admission, tokens: int, cost: float) -> None:
        pass


class Ledger:
    async def publish(self, event: UsageEvent) -> None:
        pass

    def submit(self, event: UsageEvent) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_admission_reports_admissions_refusals_and_ends() -> None:
    metrics, _ = gateway_metrics(tenants=["ten_a"])
    who = Principal("key_a", "ten_a", "member", None, Limits(), Limits())
    entry = CatalogEntry("chat", CHAT)
    parsed = ChatCompletionRequest(model="chat", messages=[{"role": "user", "content": "hi"}])
    for refuse, status in (("token_limit", 429), (None, 200)):
        accountant = Accountant(Limiter(refuse), Ledger(), PriceBook())  # type: ignore[arg-type]
        admission = AdmissionHook(accountant, metrics)
        ctx = RequestContext(who, uuid.uuid4().hex, "/v1/chat/completions", "chat",
                             admission.after, model="chat", body=b" " * 64, parsed=parsed,
                             entry=entry)
        try:
            await admission.before(ctx)
            in_flight = scrape(metrics)["llmops_requests_in_flight"]
            assert value(in_flight, "llmops_requests_in_flight", model="chat") == 1
            ctx.pool, ctx.device = GPU, "gpu"
        except LimitExceededError:
            pass
        ctx.close(status)
        await accountant.drain()
    s = scrape(metrics)
    assert value(s["llmops_rejections"], "llmops_rejections_total", reason="token_limit",
                 tenant="ten_a") == 1
    assert value(s["llmops_requests"], "llmops_requests_total", status_class="4xx",
                 pool="none", model="chat") == 1
    assert value(s["llmops_requests"], "llmops_requests_total", status_class="2xx",
                 pool="primary", device="gpu") == 1
    assert value(s["llmops_requests_in_flight"], "llmops_requests_in_flight") == 0


async def test_background_readings_are_cached_and_failures_skip_only_their_family(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observability.metrics, "_READ_TIMEOUT_S", 0.05)
    metrics, _ = gateway_metrics()
    reads = 0
    broken = True

    async def queues() -> Mapping[str, float]:
        nonlocal reads
        reads += 1
        return {"finetune": 2.0, "ingest": 0.0}

    async def jobs() -> Mapping[str, float]:
        if broken:
            raise ConnectionError("database down")
        return {"running": 1.0}

    async def files() -> Mapping[str, float]:
        await asyncio.sleep(10)  # hangs: the timeout gives up on it
        return {}

    metrics.add_readings([Reading("llmops_queue_length", "Queued.", "queue", queues),
                          Reading("llmops_finetune_jobs", "Jobs.", "status", jobs),
                          Reading("llmops_vector_store_files", "Files.", "status", files)])
    await metrics.refresh()
    for _ in range(3):
        s = scrape(metrics)
    assert reads == 1  # scrapes read the cache, never the source
    assert value(s["llmops_queue_length"], "llmops_queue_length", queue="finetune") == 2
    assert "llmops_finetune_jobs" not in s and "llmops_vector_store_files" not in s
    errors = s["llmops_metrics_collect_errors"]
    assert value(errors, "llmops_metrics_collect_errors_total",
                 family="llmops_finetune_jobs") == 1
    assert value(errors, "llmops_metrics_collect_errors_total",
                 family="llmops_vector_store_files") == 1
    broken = False
    await metrics.refresh()
    assert value(scrape(metrics)["llmops_finetune_jobs"], "llmops_finetune_jobs",
                 status="running") == 1


READINGS = ("llmops_finetune_jobs", "llmops_vector_store_files", "llmops_queue_length")
UNIT = {"admin_key": "sk-unit",
        "models": [{"name": "m", "kind": "chat",
                    "pools": [{"device": "cpu", "urls": ["http://x:1"]}]}]}


async def get_metrics(settings: Settings, headers: dict[str, str] | None = None
                      ) -> httpx.Response:
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as client:
        return await client.get("/metrics", headers=headers)


async def test_metrics_are_open_by_default_and_not_in_the_api_document() -> None:
    resp = await get_metrics(Settings(**UNIT))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(resp.text)}
    assert {"llmops_requests", "llmops_backend_healthy"} <= names
    app = create_app(Settings(**UNIT))
    assert "/metrics" not in app.openapi()["paths"]


async def test_a_metrics_token_is_required_when_configured() -> None:
    settings = Settings(**UNIT, metrics={"token": "scrape-secret"})
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-unit"}):
        resp = await get_metrics(settings, headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    resp = await get_metrics(settings, {"Authorization": "Bearer scrape-secret"})
    assert resp.status_code == 200 and "llmops_requests_in_flight" in resp.text


async def test_no_metrics_route_when_disabled_or_on_a_port_of_their_own() -> None:
    assert (await get_metrics(Settings(**UNIT, metrics={"enabled": False}))).status_code == 404
    assert (await get_metrics(Settings(**UNIT, metrics={"port": 9}))).status_code == 404


@pytest.fixture
async def engine() -> AsyncIterator[str]:
    """A tiny stand-in for vLLM at the HTTP boundary."""

    async def chat(_: web.Request) -> web.Response:
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2}})

    async with serve_engine(chat) as url:
        yield url


async def test_metrics_on_their_own_port_with_celery_queue_lengths(engine: str, tmp_path: Path
                                                                   ) -> None:
    port, prefix = free_port(), f"llmops-test-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        admin_key="sk-unit", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        redis_prefix=prefix, ledger={"spool_path": tmp_path / "spool"},
        files={"root": tmp_path / "files"}, metrics={"port": port, "token": "scrape-secret"},
        models=[{"name": "m", "kind": "chat", "pools": [{"device": "cpu", "urls": [engine]}]}])
    celery = make_celery(settings)  # a job waiting for a worker, queued as the gateway would
    try:
        celery.send_task(FINETUNE_TASK, args=["ftjob-unit"])
    finally:
        celery.close()
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gw") as client:
                resp = await client.post(
                    "/v1/chat/completions", headers={"Authorization": "Bearer sk-unit"},
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert resp.status_code == 200
                assert (await client.get("/metrics")).status_code == 404
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as scraper:
                assert (await scraper.get("/metrics")).status_code == 401
                for _ in range(100):  # until the background task's first round is in
                    resp = await scraper.get(
                        "/metrics", headers={"Authorization": "Bearer scrape-secret"})
                    if all(f"# TYPE {name} gauge" in resp.text for name in READINGS):
                        break
                    await asyncio.sleep(0.1)
        with pytest.raises(httpx.ConnectError):  # the port is closed with the app
            async with httpx.AsyncClient() as late:
                await late.get(f"http://127.0.0.1:{port}/metrics")
    finally:
        redis = Redis.from_url(settings.redis_url)
        await redis.delete(*[k async for k in redis.scan_iter(f"{prefix}:*")] or ["-"])
        await redis.aclose()
    s = {f.name: f.samples for f in text_string_to_metric_families(resp.text)}
    assert value(s["llmops_requests"], "llmops_requests_total", model="m", pool="primary",
                 device="cpu", status_class="2xx") == 1
    assert value(s["llmops_tokens"], "llmops_tokens_total", kind="completion") == 2
    assert value(s["llmops_queue_length"], "llmops_queue_length", queue="finetune") == 1
    assert value(s["llmops_queue_length"], "llmops_queue_length", queue="ingest") == 0
    assert value(s["llmops_finetune_jobs"], "llmops_finetune_jobs", status="running") == 0
    assert value(s["llmops_vector_store_files"], "llmops_vector_store_files",
                 status="in_progress") == 0
