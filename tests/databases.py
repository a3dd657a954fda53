"""The SQL store on SQLite and on PostgreSQL, and the real Redis, for store-level tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy
from fastapi import FastAPI
from redis.asyncio import Redis

from gateway.app import create_app
from llmops.settings import Settings
from llmops.store import Database, upgrade

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'llmops.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    upgrade(database_url)
    database = Database(database_url)
    async with database.engine.begin() as conn:  # each test starts from empty tables
        for table in ("batch_requests", "batches", "conversation_items", "conversations",
                      "responses", "eval_output_items", "eval_runs", "evals",
                      "vector_store_files", "vector_store_file_batches", "vector_stores",
                      "fine_tuning_events", "fine_tuning_checkpoints", "fine_tuning_jobs",
                      "files", "usage_records", "api_keys", "tenants", "model_prices"):
            await conn.execute(sqlalchemy.text(f"DELETE FROM {table}"))
    yield database
    await database.close()


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    """A Redis key prefix of this test's own, cleaned up afterwards."""
    value = f"llmops-test-{uuid.uuid4().hex[:12]}"
    yield value
    keys = [k async for k in redis.scan_iter(f"{value}:*")]
    if keys:
        await redis.delete(*keys)


@contextlib.asynccontextmanager
async def in_process_gateway(settings: Settings, admin_key: str, app: FastAPI | None = None
                             ) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app (`app`, or one made from `settings`) in this process (real store and
    Redis), called as its admin; its Redis keys are removed afterwards."""
    app = app or create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw",
            headers={"authorization": f"Bearer {admin_key}"}) as client:
        yield client
    redis = Redis.from_url(REDIS_URL)
    keys = [k async for k in redis.scan_iter(f"{settings.redis_prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()
