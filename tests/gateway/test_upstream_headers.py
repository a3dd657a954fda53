"""What the gateway sends upstream: the client's credentials and headers stay behind. The
upstream here is a tiny inline server standing in for vLLM at the HTTP boundary, so that the
exact request it receives can be inspected."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from redis.asyncio import Redis

from gateway.app import create_app
from llmops.settings import Settings
from tests.standin import serve_engine

KEY = "sk-admin-unit-headers"


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "body": await request.json()})
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

    async with serve_engine(chat) as url:
        yield url, seen


async def test_client_credentials_and_headers_never_reach_the_engine(
        upstream: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    url, seen = upstream
    prefix = f"llmops-test-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        admin_key=KEY, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        redis_prefix=prefix,
        ledger={"spool_path": tmp_path / "spool"}, files={"root": tmp_path / "files"},
        models=[{"name": "m", "kind": "chat", "served_name": "engine-name",
                 "pools": [{"device": "gpu", "urls": [url]}]}])
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            resp = await client.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0.5, "vendor_extension": {"keep": True}},
                headers={"Authorization": f"Bearer {KEY}", "Cookie": "session=secret",
                         "X-Api-Key": "other-secret", "x-request-id": "rid-1"})
    redis = Redis.from_url(settings.redis_url)
    await redis.delete(*[k async for k in redis.scan_iter(f"{prefix}:*")] or ["-"])
    await redis.aclose()
    assert resp.status_code == 200 and resp.headers["x-llmops-pool"] == "gpu"
    [request] = seen
    sent = {k.lower(): v for k, v in request["headers"].items()}
    assert "authorization" not in sent and "cookie" not in sent and "x-api-key" not in sent
    assert sent["x-request-id"] == "rid-1"
    # The body passes through unchanged but for the engine's own model name.
    assert request["body"] == {"model": "engine-name", "temperature": 0.5,
                               "messages": [{"role": "user", "content": "hi"}],
                               "vendor_extension": {"keep": True}}


async def test_a_request_class_becomes_the_engine_priority_where_engines_schedule_by_it(
        upstream: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """`x-llmops-priority` sets vLLM's `priority` on pools with priority scheduling and on no
    other; a `priority` in the body never reaches the engine (it could jump the queue)."""
    url, seen = upstream
    prefix = f"llmops-test-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        admin_key=KEY, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        redis_prefix=prefix,
        ledger={"spool_path": tmp_path / "spool"}, files={"root": tmp_path / "files"},
        models=[{"name": "m", "kind": "chat", "pools": [
                    {"device": "gpu", "urls": [url], "priority_scheduling": True}]},
                {"name": "fcfs", "kind": "chat", "pools": [{"device": "gpu", "urls": [url]}]}])
    app = create_app(settings)
    auth = {"Authorization": f"Bearer {KEY}"}
    sent = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            for model, priority, header in (("m", None, "batch"), ("m", -5, None),
                                            ("m", None, "background"), ("fcfs", 3, "batch")):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                if priority is not None:
                    body["priority"] = priority
                headers = {**auth, **({"x-llmops-priority": header} if header else {})}
                resp = await client.post("/v1/chat/completions", json=body, headers=headers)
                assert resp.status_code == 200, resp.text
                sent.append(seen[-1]["body"].get("priority"))
            refused = await client.post(
                "/v1/chat/completions", headers={**auth, "x-llmops-priority": "urgent"},
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    redis = Redis.from_url(settings.redis_url)
    await redis.delete(*[k async for k in redis.scan_iter(f"{prefix}:*")] or ["-"])
    await redis.aclose()
    assert sent == [1, None, 2, None]
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == (
        "x-llmops-priority must be one of interactive, batch, background")
