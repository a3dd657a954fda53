"""Regression watches in the store, on SQLite and PostgreSQL: tenant scoping and unique
names, the limits (also under concurrent creations), due watches claimed by exactly one of
two schedulers, the first completed run accepted by itself and another accepted on request,
cascades when an eval or a run goes, the gauges with bounded labels, and the scheduler
starting runs as the watch's key, skipping a round while the previous run is active, and
recording why a run was refused (a model it may not use, a revoked key)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from evals.runs import RunStarter
from evals.scheduler import WatchScheduler, start_watch_run
from evals.store import Evals
from evals.watches import EvalWatches, InvalidRunError, WatchLimitError, WatchView, pass_rate
from llmops.catalog import Catalog
from llmops.errors import ModelNotFoundError
from llmops.files import Files
from llmops.settings import EvalsConfig, MetricsConfig, ModelConfig
from llmops.store import Base, Database, Eval, EvalRun, EvalWatch, aware, utcnow
from llmops.store.db import sync_url
from observability.metrics import GatewayMetrics
from observability.watch_metrics import FAMILY, EvalWatchGauges, criterion_label
from tenancy.auth import acting_for
from tenancy.tenants import ConflictError, NotFoundError, Tenancy
from tests.evals.test_store import new_eval, outcome

SOURCE = {"type": "completions", "source": {"type": "file_id", "id": "file-1"},
          "input_messages": {"type": "item_reference", "item_reference": "item.question"}}


async def watch_of(watches: EvalWatches, ev: Eval, name: str = "nightly", *,
                   interval_s: int = 60, min_pass_rate: float | None = None,
                   tolerance: float = 0.0, per_tenant: int = 10, total: int = 10
                   ) -> EvalWatch:
    return await watches.create(ev, key_id=f"key_{ev.tenant_id}", name=name, model="chat",
                                data_source=SOURCE, interval_s=interval_s,
                                min_pass_rate=min_pass_rate, tolerance=tolerance,
                                enabled=True, max_per_tenant=per_tenant, max_total=total)


async def finished_run(evals: Evals, ev: Eval, passed: int, failed: int,
                       status: str = "completed") -> EvalRun:
    """A run of `ev` that graded `passed` + `failed` items and ended with `status`."""
    run = await evals.create_run(ev, key_id="k", name="r", model="chat", data_source={},
                                 metadata={}, items_total=passed + failed)
    assert await evals.claim(run.id, "w", 60)
    for i in range(passed + failed):
        assert await evals.record(run.id, "w", outcome(i, "pass" if i < passed else "fail"))
    if status != "in_progress":
        assert await evals.update_run(run.id, "w", status=status)
    done = await evals.run(run.id)
    assert done is not None
    return done


async def make_due(db: Database, *watch_ids: str) -> None:
    async with db.session() as session:
        await session.execute(sqlalchemy.update(EvalWatch)
                              .where(EvalWatch.id.in_(watch_ids))
                              .values(next_run_at=utcnow() - timedelta(seconds=1)))
        await session.commit()


def test_the_migration_matches_the_model(database_url: str) -> None:
    from llmops.store import upgrade

    upgrade(database_url)
    engine = sqlalchemy.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert [d for d in diff if "eval_watches" in str(d)] == []


async def test_watches_belong_to_their_tenant_and_names_are_unique_per_tenant(
        db: Database) -> None:
    evals, watches = Evals(db), EvalWatches(db)
    ev, theirs = await new_eval(evals), await new_eval(evals, "ten_b")
    watch = await watch_of(watches, ev)
    assert aware(watch.next_run_at) - aware(watch.created_at) == timedelta(seconds=60)
    with pytest.raises(ConflictError):
        await watch_of(watches, await new_eval(evals, name="another"))
    assert (await watch_of(watches, theirs)).name == "nightly"  # their own namespace
    for call in (watches.get("ten_b", ev.id, watch.id), watches.delete("ten_b", ev.id, watch.id),
                 watches.update("ten_b", ev.id, watch.id, {"enabled": False}),
                 watches.get("ten_a", theirs.id, watch.id)):
        with pytest.raises(NotFoundError):
            await call
    assert [w.id for w in await watches.list_watches("ten_a", ev.id)] == [watch.id]
    assert await watches.list_watches("ten_b", ev.id) == []
    await watches.delete("ten_a", ev.id, watch.id)
    assert await watches.list_watches("ten_a", ev.id) == []


async def test_limits_hold_per_tenant_in_all_and_under_concurrent_creations(
        db: Database) -> None:
    evals, watches = Evals(db), EvalWatches(db)
    ev = await new_eval(evals)
    await watch_of(watches, ev, "a", per_tenant=2)
    await watch_of(watches, ev, "b", per_tenant=2)
    with pytest.raises(WatchLimitError, match="organization"):
        await watch_of(watches, ev, "c", per_tenant=2)
    theirs = await new_eval(evals, "ten_b")
    with pytest.raises(WatchLimitError, match="platform"):
        await watch_of(watches, theirs, "c", total=2)
    # Five at once with room for two more: two get in, wherever the race goes.
    outcomes = await asyncio.gather(*(watch_of(watches, theirs, f"w{i}", total=4)
                                      for i in range(5)), return_exceptions=True)
    assert sum(isinstance(o, EvalWatch) for o in outcomes) == 2
    assert all(isinstance(o, EvalWatch | WatchLimitError) for o in outcomes), outcomes
    assert len(await watches.list_watches("ten_b", theirs.id)) == 2


async def test_two_schedulers_claim_each_due_watch_exactly_once(database_url: str,
                                                                 db: Database) -> None:
    evals, first = Evals(db), EvalWatches(db)
    other_db = Database(database_url)  # another gateway: its own connections
    second = EvalWatches(other_db)
    try:
        ev = await new_eval(evals)
        made = [await watch_of(first, ev, f"w{i}", interval_s=300, per_tenant=20, total=20)
                for i in range(12)]
        off = await watch_of(first, ev, "off", per_tenant=20, total=20)
        await first.update("ten_a", ev.id, off.id, {"enabled": False})
        await make_due(db, *(w.id for w in made), off.id)
        assert await first.claim_due(utcnow() - timedelta(minutes=1)) == []  # not due then
        now = utcnow()
        rounds = await asyncio.gather(*(s.claim_due(now, limit=50)
                                        for s in (first, second, first, second)))
        ids = [w.id for claimed in rounds for w in claimed]
        assert sorted(ids) == sorted(w.id for w in made)  # each once; the disabled one never
        assert await second.claim_due(utcnow()) == []  # moved one interval on
        again = await first.get("ten_a", ev.id, made[0].id)
        assert aware(again.next_run_at) == now + timedelta(seconds=300)
    finally:
        await other_db.close()


async def test_updates_move_the_next_run_and_the_accepted_run(db: Database) -> None:
    evals, watches = Evals(db), EvalWatches(db)
    ev = await new_eval(evals)
    watch = await watch_of(watches, ev, interval_s=3600)
    nearer = await watches.update("ten_a", ev.id, watch.id, {"interval_s": 60})
    assert aware(nearer.next_run_at) <= utcnow() + timedelta(seconds=61)
    await watches.update("ten_a", ev.id, watch.id, {"enabled": False})
    back = await watches.update("ten_a", ev.id, watch.id, {"enabled": True})
    assert aware(back.next_run_at) <= utcnow()  # due now
    assert aware(back.enabled_at) > aware(watch.enabled_at)
    cleared = await watches.update("ten_a", ev.id, watch.id,
                                   {"min_pass_rate": 0.5, "tolerance": 0.1})
    assert (cleared.min_pass_rate, cleared.tolerance) == (0.5, 0.1)
    with pytest.raises(ValueError, match="not updatable"):
        await watches.update("ten_a", ev.id, watch.id, {"model": "other"})

    running = await finished_run(evals, ev, 1, 0, status="in_progress")
    elsewhere = await finished_run(evals, await new_eval(evals, name="x"), 1, 0)
    for run_id in (running.id, elsewhere.id, "evalrun_missing"):
        with pytest.raises(InvalidRunError):
            await watches.update("ten_a", ev.id, watch.id, {"accepted_run_id": run_id})


async def test_the_first_completed_run_is_accepted_and_regressions_show(db: Database) -> None:
    evals, watches = Evals(db), EvalWatches(db)
    ev = await new_eval(evals)
    watch = await watch_of(watches, ev, min_pass_rate=0.7, tolerance=0.1)
    good = await finished_run(evals, ev, 4, 0, status="in_progress")
    await watches.started(watch.id, good.id)
    assert await watches.observe() == 0  # not completed yet
    assert await watches.active_run(await watches.get("ten_a", ev.id, watch.id))
    assert await evals.update_run(good.id, "w", status="completed")
    assert await watches.observe() == 1 and await watches.observe() == 0
    [view] = await watches.views([await watches.get("ten_a", ev.id, watch.id)])
    assert view.latest is not None and view.accepted is not None
    assert view.latest.id == view.accepted.id == good.id
    assert not view.regressed and not view.below_threshold

    worse = await finished_run(evals, ev, 3, 2)  # 0.6: below 0.7 and below 1.0 - 0.1
    await watches.started(watch.id, worse.id)
    await watches.observe()
    [view] = await watches.views([await watches.get("ten_a", ev.id, watch.id)])
    assert view.latest is not None and view.latest.id == worse.id
    assert view.accepted is not None and view.accepted.id == good.id  # the baseline stays
    assert pass_rate(view.latest) == 0.6 and view.regressed and view.below_threshold

    accepted = await watches.update("ten_a", ev.id, watch.id, {"accepted_run_id": worse.id})
    [view] = await watches.views([accepted])
    assert not view.regressed and view.below_threshold
    # No accepted run: the next completed one becomes it.
    await watches.update("ten_a", ev.id, watch.id, {"accepted_run_id": None})
    fine = await finished_run(evals, ev, 5, 0)
    await watches.started(watch.id, fine.id)
    await watches.observe()
    assert (await watches.get("ten_a", ev.id, watch.id)).accepted_run_id == fine.id


async def test_a_deleted_run_leaves_the_watch_and_a_deleted_eval_takes_it(
        db: Database) -> None:
    evals, watches = Evals(db), EvalWatches(db)
    ev = await new_eval(evals)
    watch = await watch_of(watches, ev)
    run = await finished_run(evals, ev, 2, 0)
    await watches.started(watch.id, run.id)
    await watches.observe()
    await evals.delete_run("ten_a", ev.id, run.id)
    left = await watches.get("ten_a", ev.id, watch.id)
    assert (left.last_run_id, left.last_completed_run_id, left.accepted_run_id) == (
        None, None, None)
    await evals.delete("ten_a", ev.id)
    with pytest.raises(NotFoundError):
        await watches.get("ten_a", ev.id, watch.id)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_gauges_export_enabled_watches_with_bounded_labels(db: Database) -> None:
    evals, watches = Evals(db), EvalWatches(db)
    labelled = await new_eval(evals, "ten_a")
    watch = await watch_of(watches, labelled, min_pass_rate=0.9, tolerance=0.05,
                           interval_s=600)
    run = await finished_run(evals, labelled, 3, 1)
    await watches.started(watch.id, run.id)
    muted = await watch_of(watches, labelled, "muted")
    await watches.update("ten_a", labelled.id, muted.id, {"enabled": False})
    # Two unlabelled tenants, one watch name: the one nearer its alert stands for both.
    for tenant, passed in (("ten_b", 4), ("ten_c", 1)):
        ev = await new_eval(evals, tenant)
        theirs = await watch_of(watches, ev, "shared", min_pass_rate=0.5)
        run = await finished_run(evals, ev, passed, 4 - passed)
        await watches.started(theirs.id, run.id)
    await watches.observe()

    metrics = GatewayMetrics(MetricsConfig(top_tenants=0, tenants=["ten_a"]), [], {})
    broken = False

    async def read() -> list[WatchView]:
        if broken:
            raise ConnectionError("database down")
        return await watches.enabled_views()

    metrics.add_collector(FAMILY, EvalWatchGauges(read, metrics.tenants))
    await metrics.refresh()
    got = scrape(metrics.registry)
    mine = (("tenant", "ten_a"), ("watch", "nightly"))
    assert got[("llmops_eval_pass_ratio", mine)] == 0.75
    assert got[("llmops_eval_accepted_pass_ratio", mine)] == 0.75
    assert got[("llmops_eval_criterion_pass_ratio", (("criterion", "exact"), *mine))] == 0.75
    assert got[("llmops_eval_min_pass_ratio", mine)] == 0.9
    assert got[("llmops_eval_tolerance_ratio", mine)] == 0.05
    assert got[("llmops_eval_interval_seconds", mine)] == 600
    assert abs(got[("llmops_eval_last_run_timestamp_seconds", mine)]
               - utcnow().timestamp()) < 60
    shared = (("tenant", "other"), ("watch", "shared"))
    assert got[("llmops_eval_pass_ratio", shared)] == 0.25  # ten_c's: below its 0.5
    assert not any(dict(labels).get("watch") == "muted" for _, labels in got)
    assert {dict(labels)["tenant"] for name, labels in got
            if name.startswith("llmops_eval_")} == {"ten_a", "other"}

    broken = True  # a failed read drops the figures and is counted
    await metrics.refresh()
    got = scrape(metrics.registry)
    assert not any(name.startswith("llmops_eval_") for name, _ in got)
    assert got[("llmops_metrics_collect_errors_total", (("family", FAMILY),))] == 1
    assert criterion_label(3, "x" * 100) == "x" * 60 + "#3"


CHAT = ModelConfig(name="chat", kind="chat", pools=[{"device": "cpu", "urls": ["http://x"]}])
INLINE = {"type": "completions",
          "source": {"type": "file_content", "content": [
              {"item": {"question": "France?", "answer": "Paris"}}]},
          "input_messages": {"type": "template", "template": [
              {"role": "user", "content": "{{item.question}}"}]}}


async def test_the_scheduler_starts_skips_and_records_refusals(db: Database, tmp_path: Path
                                                               ) -> None:
    evals, watches, tenancy = Evals(db), EvalWatches(db), Tenancy(db)
    tenant = await tenancy.create_tenant("acme")
    key, _ = await tenancy.create_key(tenant.id)
    ev = await new_eval(evals, tenant.id)
    queued: list[str] = []

    async def enqueue(run_id: str) -> None:
        queued.append(run_id)

    starter = RunStarter(evals, Files(db, tmp_path, 1 << 20), Catalog([CHAT]), EvalsConfig(),
                         enqueue)
    scheduler = WatchScheduler(watches, starter, tenancy, timeout_s=5)

    async def watch_for(name: str, model: str) -> EvalWatch:
        return await watches.create(ev, key_id=key.id, name=name, model=model,
                                    data_source=INLINE, interval_s=60, min_pass_rate=None,
                                    tolerance=0.0, enabled=True, max_per_tenant=10,
                                    max_total=10)

    watch = await watch_for("nightly", "chat")
    await make_due(db, watch.id)
    await scheduler.tick()
    [run_id] = queued  # checked, stored and handed to the queue, as a client's run
    run = await evals.get_run(tenant.id, ev.id, run_id)
    assert (run.status, run.key_id, run.model, run.name, run.items_total) == (
        "queued", key.id, "chat", "watch nightly", 1)
    assert run.data_source == {**INLINE, "model": "chat"}
    assert run.metadata_ == {"eval_watch_id": watch.id, "eval_watch": "nightly"}
    assert (await watches.get(tenant.id, ev.id, watch.id)).last_run_id == run_id

    await make_due(db, watch.id)
    await scheduler.tick()  # the queued run is still queued: skipped
    skipped = await watches.get(tenant.id, ev.id, watch.id)
    assert len(queued) == 1 and skipped.skipped_runs == 1
    assert skipped.last_skip_reason is not None and run_id in skipped.last_skip_reason

    # A model the key may not use: refused as a run would be, naming the watch's own field.
    gone = await watch_for("gone", "gone")
    await make_due(db, gone.id)
    await scheduler.tick()
    refused = await watches.get(tenant.id, ev.id, gone.id)
    assert refused.last_error is not None and refused.last_error["code"] == "model_not_found"
    assert refused.last_run_id is None and len(queued) == 1
    who = await acting_for(tenancy, key.id)
    assert who is not None and who.delegated  # as our workers act for the key
    with pytest.raises(ModelNotFoundError) as caught:
        await start_watch_run(starter, who, ev, gone)
    assert caught.value.param == "model"

    # A revoked key starts nothing.
    await evals.cancel_run(tenant.id, ev.id, run_id)
    await tenancy.revoke_key(key.id)
    await make_due(db, watch.id)
    await scheduler.tick()
    revoked = await watches.get(tenant.id, ev.id, watch.id)
    assert revoked.last_error is not None and revoked.last_error["code"] == "invalid_api_key"
    assert revoked.last_run_id == run_id and len(queued) == 1


async def test_a_deleted_tenants_runs_stop_then_evals_runs_items_and_watches_go(
        db: Database) -> None:
    evals, watches = Evals(db), EvalWatches(db)
    ev, kept = await new_eval(evals), await new_eval(evals, "ten_b")
    queued = await evals.create_run(ev, key_id="key_a", name="q", model="chat",
                                    data_source={"type": "jsonl"}, metadata={}, items_total=1)
    running = await evals.create_run(ev, key_id="key_a", name="r", model="chat",
                                     data_source={"type": "jsonl"}, metadata={}, items_total=1)
    assert await evals.claim(running.id, "w", 60) is not None
    assert await evals.record(running.id, "w", outcome(0))
    watch = await watch_of(watches, ev)
    await watches.started(watch.id, running.id)  # the watch names the run
    other = await watch_of(watches, kept)
    # Stopping cancels what no worker holds and names what one still holds.
    assert await evals.stop_tenant("ten_a") == [running.id]
    assert (gone := await evals.run(queued.id)) is not None and gone.status == "canceled"
    assert not await evals.heartbeat(running.id, "w", 60)  # asked to stop
    assert await evals.update_run(running.id, "w", status="canceled")
    assert await evals.stop_tenant("ten_a") == []
    # Watches first: they name the evals and runs.
    assert await watches.forget_tenant("ten_a") == 1
    assert await evals.forget_tenant("ten_a") == 1
    with pytest.raises(NotFoundError):
        await evals.get("ten_a", ev.id)
    assert await evals.run(running.id) is None and await evals.done_items(running.id) == set()
    with pytest.raises(NotFoundError):
        await watches.get("ten_a", ev.id, watch.id)
    assert (await watches.get("ten_b", kept.id, other.id)).id == other.id
    assert (await evals.get("ten_b", kept.id)).id == kept.id
    assert await watches.forget_tenant("ten_a") == 0 and await evals.forget_tenant("ten_a") == 0
