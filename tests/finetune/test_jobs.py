"""Fine-tuning jobs in the store, on SQLite and PostgreSQL: one worker at a time, leases that
expire, cooperative cancellation, events and checkpoints."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from finetune.jobs import FineTuning
from llmops.store import Database, FineTuningCheckpoint, FineTuningEvent, FineTuningJob
from tenancy.tenants import NotFoundError

JOB = dict(tenant_id="ten_a", key_id="key_a", model="chat", training_file="file-1")


async def test_only_one_worker_claims_a_job(db: Database) -> None:
    jobs = FineTuning(db)
    job = await jobs.create(**JOB)
    claims = await asyncio.gather(*(jobs.claim(job.id, f"worker-{i}", 60) for i in range(8)))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1 and winners[0].attempts == 1
    owner = winners[0].lease_owner
    assert owner is not None
    assert await jobs.heartbeat(job.id, owner, 60)
    assert not await jobs.heartbeat(job.id, "worker-intruder", 60)
    assert not await jobs.update(job.id, "worker-intruder", status="failed")


async def test_an_expired_lease_lets_another_worker_resume(db: Database) -> None:
    jobs = FineTuning(db)
    job = await jobs.create(**JOB)
    assert await jobs.claim(job.id, "dead-worker", 0.2) is not None
    assert await jobs.orphaned() == []
    await asyncio.sleep(0.3)
    assert await jobs.orphaned() == [job.id]
    taken = await jobs.claim(job.id, "next-worker", 60)
    assert taken is not None and taken.attempts == 2 and taken.lease_owner == "next-worker"
    assert not await jobs.heartbeat(job.id, "dead-worker", 60)  # the old owner lost it
    assert await jobs.update(job.id, "next-worker", status="succeeded",
                             fine_tuned_model="ft:chat:x:1")
    done = await jobs.get(job.id)
    assert done.status == "succeeded" and done.finished_at and done.lease_owner is None
    assert await jobs.claim(job.id, "late-worker", 60) is None  # finished jobs stay finished


async def test_cancel_is_immediate_when_unheld_and_cooperative_when_running(db: Database
                                                                           ) -> None:
    jobs = FineTuning(db)
    queued = await jobs.create(**JOB)
    assert (await jobs.cancel(queued.id, "ten_a")).status == "cancelled"
    assert await jobs.claim(queued.id, "w", 60) is None
    running = await jobs.create(**JOB)
    await jobs.claim(running.id, "w", 60)
    cancelling = await jobs.cancel(running.id, "ten_a")
    assert cancelling.status == "validating_files" and cancelling.cancel_requested
    assert not await jobs.heartbeat(running.id, "w", 60)  # the worker learns it must stop
    assert await jobs.update(running.id, "w", status="cancelled")


async def test_events_and_checkpoints_stay_with_their_tenant(db: Database) -> None:
    jobs = FineTuning(db)
    job = await jobs.create(**JOB)
    for i in range(5):
        await jobs.event(job.id, f"step {i}", type_="metrics", data={"step": i})
    await jobs.checkpoint(job.id, 10, {"train_loss": 1.5})
    page, more = await jobs.events(job.id, "ten_a", limit=3)
    assert [e.message for e in page] == ["step 4", "step 3", "step 2"] and more
    rest, more = await jobs.events(job.id, "ten_a", limit=3, after=page[-1].id)
    assert [e.message for e in rest] == ["step 1", "step 0"] and not more
    assert [c.step for c in await jobs.checkpoints(job.id, "ten_a")] == [10]
    listed, _ = await jobs.list_jobs("ten_a")
    assert [j.id for j in listed] == [job.id]
    assert (await jobs.list_jobs("ten_b"))[0] == []
    with pytest.raises(LookupError):
        await jobs.get(job.id, "ten_b")
    assert isinstance(await jobs.get(job.id), FineTuningJob)


async def test_a_job_no_worker_claimed_is_orphaned_after_a_grace(db: Database) -> None:
    jobs = FineTuning(db)
    job = await jobs.create(**JOB)
    assert await jobs.orphaned() == []  # its message is on its way
    assert await jobs.orphaned(unclaimed_for=timedelta(0)) == [job.id]
    assert await jobs.claim(job.id, "worker", 60) is not None
    assert await jobs.orphaned(unclaimed_for=timedelta(0)) == []


async def test_a_deleted_tenants_jobs_stop_then_go_with_their_adapters(
        db: Database, tmp_path: Path) -> None:
    jobs = FineTuning(db)
    queued = await jobs.create(**JOB)
    running = await jobs.create(**JOB)
    other = await jobs.create(**{**JOB, "tenant_id": "ten_b"})
    assert await jobs.claim(running.id, "worker", 60) is not None
    # Stopping cancels what no worker holds and names what one still holds.
    assert await jobs.stop_tenant("ten_a") == [running.id]
    assert (await jobs.get(queued.id)).status == "cancelled"
    assert await jobs.claim(queued.id, "late-worker", 60) is None
    assert not await jobs.heartbeat(running.id, "worker", 60)  # asked to stop
    assert await jobs.update(running.id, "worker", status="cancelled")
    assert await jobs.stop_tenant("ten_a") == []
    await jobs.event(running.id, "step 1")
    await jobs.checkpoint(running.id, 1, {"loss": 1.0})
    for job in (running, other):
        (tmp_path / job.id / "adapter").mkdir(parents=True)
    assert await jobs.forget_tenant("ten_a", tmp_path) == 2
    assert not (tmp_path / running.id).exists() and (tmp_path / other.id).exists()
    for job_id in (queued.id, running.id):
        with pytest.raises(NotFoundError):
            await jobs.get(job_id)
    async with db.session() as session:
        assert set(await session.scalars(select(FineTuningEvent.job_id))) <= {other.id}
        assert list(await session.scalars(select(FineTuningCheckpoint))) == []
    assert (await jobs.get(other.id, "ten_b")).status == "validating_files"
    assert await jobs.forget_tenant("ten_a", tmp_path) == 0  # again: nothing left, no error
