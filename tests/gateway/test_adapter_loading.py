"""Loading a published fine-tuned adapter on demand, as logic: the jobs are real rows (SQLite
and PostgreSQL), the engine boundary is a gate counting loads (the loads themselves run on
real vLLM in tests/e2e/test_adapter_ready.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from finetune.jobs import FineTuning, adapter_name
from finetune.serving import adapters_channel, announce
from gateway.routing import Pool, Router, build_scorers
from gateway.routing.adapters import AdapterLoader
from llmops.catalog import Catalog
from llmops.errors import ModelNotFoundError, ServiceUnavailableError
from llmops.settings import Settings
from llmops.store import Database, FineTuningJob
from tenancy import Principal
from tenancy.tenants import Limits
from tenancy.visibility import usable_entry

BASE = "chat"
OWNER = Principal("key_a", "ten_a", "member", None, Limits(), Limits())
OTHER = Principal("key_b", "ten_b", "member", None, Limits(), Limits())
WORKER = Principal("key_a", "ten_a", "member", None, Limits(), Limits(), delegated=True)


class GatedLoader(AdapterLoader):
    """The engine's load endpoint replaced by a gate: loads are counted and end when the test
    opens the gate."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def _post_load(self, url: str, name: str, path: str) -> bool:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        return True


class CountingJobs(FineTuning):
    reads = 0

    async def get(self, job_id: str, tenant_id: str | None = None) -> FineTuningJob:
        self.reads += 1
        return await super().get(job_id, tenant_id)


def settings(**routing: Any) -> Settings:
    return Settings(models=[{"name": BASE, "kind": "chat", "pools": [
        {"device": "cpu", "urls": ["http://127.0.0.1:9"]}]}], routing=routing)


def loader_for(db: Database, **routing: Any) -> tuple[GatedLoader, Catalog, CountingJobs]:
    cfg = settings(**routing)
    catalog = Catalog(cfg.models)
    routers = {BASE: Router([Pool.from_config(p, cfg.routing) for p in cfg.models[0].pools],
                            build_scorers(cfg.routing))}
    jobs = CountingJobs(db)

    def no_session() -> Any:
        raise AssertionError("the engine boundary is gated")

    return GatedLoader(cfg, jobs, routers, catalog, no_session), catalog, jobs


async def published(jobs: FineTuning, status: str = "succeeded", **result: Any) -> str:
    job = await jobs.create(tenant_id="ten_a", key_id="key_a", model=BASE,
                            training_file="file-1", suffix="t")
    name = adapter_name(job)
    await jobs.claim(job.id, "worker", 60)
    await jobs.update(job.id, "worker", status=status, fine_tuned_model=name,
                      result={"adapter_path": "/adapters/x", "published": True, **result})
    return name


async def test_a_burst_for_a_new_adapter_loads_it_once(db: Database) -> None:
    loader, catalog, jobs = loader_for(db)
    name = await published(jobs)
    burst = asyncio.gather(*(loader.ensure(OWNER, name) for _ in range(20)))
    await loader.started.wait()
    loader.gate.set()
    await burst
    assert loader.calls == 1
    assert usable_entry(catalog, OWNER, name, "chat", "/v1/chat/completions").adapter == name


async def test_a_load_longer_than_the_bound_is_a_503_and_goes_on(db: Database) -> None:
    loader, catalog, jobs = loader_for(db, adapter_load_wait_s=0.05)
    name = await published(jobs)
    with pytest.raises(ServiceUnavailableError) as refused:
        await loader.ensure(OWNER, name)
    assert refused.value.status == 503 and refused.value.code == "model_loading"
    assert name in refused.value.message
    loader.gate.set()  # the load was not abandoned with the request
    await asyncio.gather(*loader._loads.values())
    await loader.ensure(OWNER, name)
    assert loader.calls == 1 and catalog.resolve(name) is not None


async def test_another_tenant_loads_nothing_and_gets_a_missing_models_404(db: Database
                                                                           ) -> None:
    loader, catalog, jobs = loader_for(db)
    name = await published(jobs)
    missing = name.rsplit(":", 1)[0] + ":ftjob-000000000000000000000000"
    for model in (name, missing):
        await loader.ensure(OTHER, model)
        with pytest.raises(ModelNotFoundError) as refused:
            usable_entry(catalog, OTHER, model, "chat", "/v1/chat/completions")
        assert (refused.value.status, refused.value.code) == (404, "model_not_found")
    assert loader.calls == 0


async def test_a_candidate_is_loaded_for_its_evaluation_only(db: Database) -> None:
    loader, catalog, jobs = loader_for(db)
    candidate = await published(jobs, status="running", evaluation={"state": "evaluating"})
    held = await published(jobs, evaluation={"promoted": False, "reason": "worse"})
    for name in (candidate, held):
        await loader.ensure(OWNER, name)
        assert loader.calls == 0
        with pytest.raises(ModelNotFoundError):
            usable_entry(catalog, OWNER, name, "chat", "/v1/chat/completions")
    loader.gate.set()
    await loader.ensure(WORKER, candidate)  # the worker evaluating it, acting for the owner
    assert loader.calls == 1
    assert usable_entry(catalog, WORKER, candidate, "chat", "/v1/chat/completions")
    with pytest.raises(ModelNotFoundError):
        usable_entry(catalog, OWNER, candidate, "chat", "/v1/chat/completions")
    await loader.ensure(WORKER, held)  # held back: never loaded again
    assert loader.calls == 1


async def test_names_that_serve_nothing_reach_the_database_once_a_while(db: Database) -> None:
    loader, _, jobs = loader_for(db, adapter_miss_ttl_s=60)
    for _ in range(50):
        await loader.ensure(OWNER, "ft:chat:x:ftjob-nope")
        await loader.ensure(OWNER, "gpt-garbage")  # not an adapter's name: never looked up
    assert jobs.reads == 1
    loader.poke("ft:chat:x:ftjob-nope")  # a worker announced it: asked again
    await loader.ensure(OWNER, "ft:chat:x:ftjob-nope")
    assert jobs.reads == 2


async def test_an_announced_adapter_pokes_the_gateway(db: Database, redis: Redis, prefix: str
                                                      ) -> None:
    """The worker's message, through real Redis, reaches the loader: it forgets what it looked
    up of the adapter and reconciles at once."""
    loader, _, _ = loader_for(db)
    listener = asyncio.create_task(loader.follow(redis, adapters_channel(prefix)))
    try:
        await asyncio.wait_for(loader._wake.wait(), 10)  # subscribed: it catches up once
        loader._wake.clear()
        name = "ft:chat:x:ftjob-new"
        await loader.ensure(OWNER, name)
        assert name in loader._lookups
        await announce(Settings(redis_prefix=prefix), name)
        await asyncio.wait_for(loader._wake.wait(), 10)
        assert name not in loader._lookups
    finally:
        listener.cancel()
