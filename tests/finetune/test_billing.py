"""Training is billed like inference, on the real store and Redis: each attempt's record in the
ledger (idempotent, grown as it trains, never billed twice across a resume), budgets charged
with it, and a job whose estimate does not fit the budget refused at creation with nothing
created."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from finetune.billing import ENDPOINT, AttemptBill
from finetune.jobs import FineTuning
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.settings import LimitsConfig, Settings
from llmops.store import Database, FineTuningJob, UsageRecord, upgrade
from observability.worker_metrics import METRICS
from tenancy.ledger import usage_report
from tenancy.limits import Limiter
from tenancy.pricing import Price
from tests.databases import REDIS_URL, in_process_gateway

ADMIN = "sk-unit-billing"


async def test_each_attempt_is_billed_once_for_what_it_trained(tmp_path: Path, redis: Redis,
                                                               prefix: str) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    db = Database(url)
    limiter = Limiter(redis, db, prefix, LimitsConfig())
    job = await FineTuning(db).create(tenant_id="ten_b", key_id="key_b", model="chat",
                                      training_file="file-1", attempts=1)
    month = f"{prefix}:budget:ten_b:{datetime.now(UTC):%Y%m}:spent"
    await redis.set(month, "1.0")  # the tenant's spend this month, as admission loaded it
    price = Price(1.0, 2.0, training_per_mtok=4.0)
    counted = METRICS.train_cost.labels("chat")._value.get()

    first = AttemptBill(db, job, price, 0.0, limiter.charge)
    await first.update(100_000)  # a checkpoint
    await first.update(250_000)  # the next; then the worker is killed
    job.attempts = 2  # claimed again; it resumes from the checkpoint
    second = AttemptBill(db, job, price, 0.0, limiter.charge)
    await second.update(150_000, ended=True)
    await second.update(150_000, ended=True)  # written again: still one record

    async with db.session() as session:
        rows = list(await session.scalars(select(UsageRecord).order_by(UsageRecord.request_id)))
    assert [(r.request_id, r.endpoint, r.trained_tokens, r.status) for r in rows] == [
        (f"{job.id}:1", ENDPOINT, 250_000, 0), (f"{job.id}:2", ENDPOINT, 150_000, 200)]
    assert [float(r.cost_usd) for r in rows] == [1.0, 0.6]  # 4 USD per million trained on
    assert all(r.device_seconds > 0 for r in rows)
    assert float(await redis.get(month) or 0) == pytest.approx(2.6)  # each record's cost once
    assert METRICS.train_cost.labels("chat")._value.get() - counted == pytest.approx(1.6)
    report = await usage_report(db, group_by=("tenant_id", "endpoint"))
    assert [(r["endpoint"], r["trained_tokens"], r["cost_usd"]) for r in report] == [
        (ENDPOINT, 400_000, pytest.approx(1.6))]

    # Without a training price: the workers' device time.
    third = AttemptBill(db, job, None, 3600.0, limiter.charge)  # 1 USD per device-second
    job.attempts = 3
    await third.update(10, ended=True)
    async with db.session() as session:
        row = await session.get(UsageRecord, f"{job.id}:3")
    assert row is not None and row.device_seconds > 0
    assert float(row.cost_usd) == pytest.approx(row.device_seconds, abs=1e-6)

    # A job on four devices holds all four for the attempt's whole time.
    job.attempts = 4
    await AttemptBill(db, job, None, 3600.0, limiter.charge, devices=4).update(10, ended=True)
    async with db.session() as session:
        row = await session.get(UsageRecord, f"{job.id}:4")
    assert row is not None
    assert row.device_seconds == pytest.approx(4 * row.latency_ms / 1000)
    assert float(row.cost_usd) == pytest.approx(row.device_seconds, abs=1e-6)
    await db.close()


def _examples(n: int) -> bytes:
    return b"".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is gadget {i}?"},
        {"role": "assistant", "content": f"Gadget {i} is a blue kettle."}]}).encode() + b"\n"
        for i in range(n))


async def test_a_job_over_budget_is_refused_naming_its_estimate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    weights = prepare_models(models_home())["chat"]
    settings = Settings(
        admin_key=ADMIN, database_url=url, redis_url=REDIS_URL,
        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}", files={"root": tmp_path / "files"},
        retrieval={"path": tmp_path / "qdrant"}, finetune={"min_examples": 2},
        models=[{"name": "chat", "kind": "chat", "weights": str(weights),
                 "pools": [{"device": "cpu", "urls": ["http://127.0.0.1:9"]}]}])
    async with in_process_gateway(settings, ADMIN) as admin:
        tenant = (await admin.post("/admin/tenants", json={
            "name": "thrifty", "budget_usd": 0.01})).json()
        key = (await admin.post("/admin/keys", json={"tenant_id": tenant["id"]})).json()["key"]
        # 1,000 USD per million trained tokens: a few hundred tokens cost more than 0.01 USD.
        assert (await admin.put("/admin/prices/chat", json={
            "input_per_mtok": 1, "output_per_mtok": 1, "training_per_mtok": 1000})
                ).status_code == 200
        user = {"authorization": f"Bearer {key}"}
        upload = await admin.post("/v1/files", headers=user, data={"purpose": "fine-tune"},
                                  files={"file": ("t.jsonl", _examples(8))})
        assert upload.status_code == 200, upload.text
        before = upload.json()

        refused = await admin.post("/v1/fine_tuning/jobs", headers=user, json={
            "model": "chat", "training_file": before["id"],
            "hyperparameters": {"n_epochs": 2}})
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
        assert "estimated cost" in error["message"] and "USD" in error["message"]
        assert "tokens to train on" in error["message"]

        db = Database(url)
        async with db.session() as session:
            assert await session.scalar(select(func.count()).select_from(FineTuningJob)) == 0
        await db.close()
        after = (await admin.get(f"/v1/files/{before['id']}", headers=user)).json()
        assert after == before  # the file is as it was
