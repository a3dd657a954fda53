"""Evals, runs and output items in the store, on SQLite and PostgreSQL: tenant scoping, cursor
pagination, one worker per run under a lease, items stored once with the run's tallies,
cancellation, and a run that resumes after its worker died without grading an item twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy
from aiohttp import web
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from evals.client import GatewayTransport
from evals.runner import execute_run, in_process
from evals.runs import RunStarter, parse_run
from evals.store import Evals, ItemOutcome, RunLimitError, pass_ratios
from llmops.catalog import Catalog
from llmops.files import Files
from llmops.settings import ModelConfig, Settings
from llmops.store import Base, Database, Eval
from llmops.store.db import sync_url
from tenancy.tenants import ON_BEHALF_HEADER, Limits, NotFoundError, Principal

CRITERIA = [{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}]
CONFIG = {"type": "custom", "include_sample_schema": True, "item_schema": {
    "type": "object", "properties": {"question": {"type": "string"},
                                     "answer": {"type": "string"}}}}


async def new_eval(evals: Evals, tenant: str = "ten_a", name: str = "capitals") -> Eval:
    return await evals.create(tenant_id=tenant, key_id=f"key_{tenant}", name=name,
                              metadata={"team": "qa"}, data_source_config=CONFIG,
                              testing_criteria=CRITERIA)


def outcome(index: int, status: str = "pass", model: str = "chat") -> ItemOutcome:
    passed = status == "pass"
    results = [{"name": "exact", "passed": passed, "score": float(passed),
                "error": "boom" if status == "error" else None}]
    usage = {model: {"invocation_count": 1, "prompt_tokens": 10, "completion_tokens": 2,
                     "total_tokens": 12, "cached_tokens": 0}}
    return ItemOutcome(index, {"question": f"q{index}"}, {"output": []}, results,
                       status, usage)  # type: ignore[arg-type]


async def test_evals_runs_and_items_belong_to_their_tenant(db: Database) -> None:
    evals = Evals(db)
    ev = await new_eval(evals)
    run = await evals.create_run(ev, key_id="key_a", name="r", model="chat",
                                 data_source={"type": "jsonl"}, metadata={}, items_total=1)
    assert await evals.claim(run.id, "w", 60) is not None
    assert await evals.record(run.id, "w", outcome(0))
    item = (await evals.list_items("ten_a", ev.id, run.id))[0][0]
    for call in (evals.get("ten_b", ev.id), evals.get_run("ten_b", ev.id, run.id),
                 evals.list_runs("ten_b", ev.id), evals.cancel_run("ten_b", ev.id, run.id),
                 evals.get_item("ten_b", ev.id, run.id, item.id),
                 evals.list_items("ten_b", ev.id, run.id), evals.delete("ten_b", ev.id),
                 evals.update("ten_b", ev.id, name="mine now")):
        with pytest.raises(NotFoundError):
            await call
    other = await new_eval(evals, "ten_a", "other")
    with pytest.raises(NotFoundError):  # a run is found under its own eval only
        await evals.get_run("ten_a", other.id, run.id)
    assert [e.id for e in (await evals.list_evals("ten_b"))[0]] == []
    renamed = await evals.update("ten_a", ev.id, name="renamed", metadata={"v": "2"})
    assert (renamed.name, renamed.metadata_) == ("renamed", {"v": "2"})
    assert renamed.updated_at >= renamed.created_at


async def test_listings_page_with_after_limit_and_order(db: Database) -> None:
    evals = Evals(db)
    made = [await new_eval(evals, name=f"e{i}") for i in range(5)]
    ids = [e.id for e in made]
    page, more = await evals.list_evals("ten_a", limit=2)
    assert [e.id for e in page] == ids[:2] and more
    page, more = await evals.list_evals("ten_a", limit=2, after=ids[1])
    assert [e.id for e in page] == ids[2:4] and more
    page, more = await evals.list_evals("ten_a", limit=2, after=ids[3])
    assert [e.id for e in page] == ids[4:] and not more
    page, _ = await evals.list_evals("ten_a", limit=10, order="desc", after=ids[2])
    assert [e.id for e in page] == ids[1::-1]

    runs = [await evals.create_run(made[0], key_id="k", name=f"r{i}", model="chat",
                                   data_source={}, metadata={}, items_total=4)
            for i in range(3)]
    run_page, more = await evals.list_runs("ten_a", made[0].id, limit=2, order="desc")
    assert [r.id for r in run_page] == [runs[2].id, runs[1].id] and more
    assert (await evals.list_runs("ten_a", made[0].id, status="completed"))[0] == []
    assert await evals.active_runs("ten_a") == 3 and await evals.active_runs("ten_b") == 0

    run = runs[0]
    assert await evals.claim(run.id, "w", 60)
    for index, status in ((2, "fail"), (0, "pass"), (3, "error"), (1, "pass")):
        assert await evals.record(run.id, "w", outcome(index, status))
    items, more = await evals.list_items("ten_a", made[0].id, run.id, limit=3)
    assert [i.datasource_item_id for i in items] == [0, 1, 2] and more
    items, more = await evals.list_items("ten_a", made[0].id, run.id, after=items[-1].id)
    assert [i.datasource_item_id for i in items] == [3] and not more
    items, _ = await evals.list_items("ten_a", made[0].id, run.id, order="desc", limit=2)
    assert [i.datasource_item_id for i in items] == [3, 2]
    passed, _ = await evals.list_items("ten_a", made[0].id, run.id, status="pass")
    assert [i.datasource_item_id for i in passed] == [0, 1]


async def test_a_tenants_active_runs_are_bounded_whatever_the_race(db: Database) -> None:
    evals = Evals(db)
    ev, theirs = await new_eval(evals), await new_eval(evals, "ten_b")

    async def create(on: Eval = ev) -> Any:
        return await evals.create_run(on, key_id="k", name="r", model="chat", data_source={},
                                      metadata={}, items_total=1, max_active=2)

    first = await create()
    # Four at once with room for one more: one gets in, wherever the race goes.
    outcomes = await asyncio.gather(*(create() for _ in range(4)), return_exceptions=True)
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, RunLimitError) for o in outcomes
               if isinstance(o, BaseException)), outcomes
    assert await evals.active_runs("ten_a") == 2
    assert await create(theirs)  # another tenant's room is its own
    await evals.cancel_run("ten_a", ev.id, first.id)
    assert await create()  # a finished run makes room
    # Internal runs (a promotion's evaluation) are not bounded.
    assert await evals.create_run(ev, key_id="k", name="r", model="chat", data_source={},
                                  metadata={}, items_total=1)


async def test_an_item_is_stored_once_with_the_runs_tallies(db: Database) -> None:
    evals = Evals(db)
    ev = await new_eval(evals)
    run = await evals.create_run(ev, key_id="key_a", name="r", model="chat",
                                 data_source={}, metadata={}, items_total=4)
    assert await evals.claim(run.id, "w", 60)
    results = await asyncio.gather(*(evals.record(run.id, "w", outcome(i, s)) for i, s in
                                     ((0, "pass"), (1, "fail"), (2, "error"), (3, "pass"))))
    assert all(results)
    assert not await evals.record(run.id, "w", outcome(1, "pass"))  # stored already
    assert not await evals.record(run.id, "intruder", outcome(4))  # not the lease holder
    done = await evals.get_run("ten_a", ev.id, run.id)
    assert (done.passed, done.failed, done.errored) == (2, 1, 1)
    assert done.per_criteria == {"exact": {"passed": 2, "failed": 1, "errored": 1,
                                           "score_sum": 2.0}}  # errored scores not summed
    assert done.per_model_usage["chat"] == {"invocation_count": 4, "prompt_tokens": 40,
                                            "completion_tokens": 8, "total_tokens": 48,
                                            "cached_tokens": 0}
    assert pass_ratios(done) == {"exact": 0.5}  # an errored item did not pass
    assert await evals.done_items(run.id) == {0, 1, 2, 3}


async def test_one_worker_holds_a_run_and_an_expired_lease_frees_it(db: Database) -> None:
    evals = Evals(db)
    ev = await new_eval(evals)
    run = await evals.create_run(ev, key_id="k", name="r", model="chat", data_source={},
                                 metadata={}, items_total=1)
    claims = await asyncio.gather(*(evals.claim(run.id, f"w{i}", 0.3) for i in range(6)))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1 and winners[0].attempts == 1
    assert await evals.orphaned() == []
    await asyncio.sleep(0.4)
    assert await evals.orphaned() == [run.id]
    taken = await evals.claim(run.id, "next", 60)
    assert taken is not None and taken.attempts == 2
    assert not await evals.heartbeat(run.id, str(winners[0].lease_owner), 60)
    assert await evals.update_run(run.id, "next", status="completed")
    finished = await evals.get_run("ten_a", ev.id, run.id)
    assert finished.finished_at is not None and finished.lease_owner is None
    assert await evals.claim(run.id, "late", 60) is None  # finished runs stay finished


async def test_cancel_is_immediate_when_unheld_and_cooperative_when_held(db: Database
                                                                         ) -> None:
    evals = Evals(db)
    ev = await new_eval(evals)
    queued = await evals.create_run(ev, key_id="k", name="q", model="chat",
                                    data_source={}, metadata={}, items_total=1)
    assert (await evals.cancel_run("ten_a", ev.id, queued.id)).status == "canceled"
    assert await evals.claim(queued.id, "w", 60) is None
    held = await evals.create_run(ev, key_id="k", name="h", model="chat", data_source={},
                                  metadata={}, items_total=1)
    await evals.claim(held.id, "w", 60)
    asked = await evals.cancel_run("ten_a", ev.id, held.id)
    assert asked.status == "queued" and asked.cancel_requested
    assert not await evals.heartbeat(held.id, "w", 60)  # the worker learns it must stop
    assert await evals.update_run(held.id, "w", status="canceled")
    assert await evals.active_runs("ten_a") == 0


async def test_deleting_an_eval_takes_its_runs_and_items(db: Database) -> None:
    evals = Evals(db)
    ev = await new_eval(evals)
    run = await evals.create_run(ev, key_id="k", name="r", model="chat", data_source={},
                                 metadata={}, items_total=1)
    await evals.claim(run.id, "w", 60)
    await evals.record(run.id, "w", outcome(0))
    await evals.delete("ten_a", ev.id)
    assert await evals.run(run.id) is None
    assert await evals.done_items(run.id) == set()
    assert not await evals.record(run.id, "w", outcome(1))  # its worker stops storing


def test_the_migration_matches_the_models(database_url: str) -> None:
    from llmops.store import upgrade

    upgrade(database_url)
    engine = sqlalchemy.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    ours = {"evals", "eval_runs", "eval_output_items"}
    assert [d for d in diff if _tables(d) & ours] == []


def _tables(diff: Any) -> set[str]:
    """The tables one autogenerate difference is about."""
    if isinstance(diff, list):
        return set().union(*(_tables(d) for d in diff))
    names = set()
    for part in diff:
        if isinstance(part, str):
            names.add(part)
        elif isinstance(part, sqlalchemy.Table):
            names.add(part.name)
        elif isinstance(getattr(part, "table", None), sqlalchemy.Table):
            names.add(part.table.name)
    return names


class FakeGateway:
    """A stand-in for the gateway's chat endpoint: answers "Paris" to questions about France,
    and remembers what it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(({k.lower(): v for k, v in request.headers.items()}, body))
        text = "Paris" if "France" in body["messages"][-1]["content"] else "I do not know"
        return web.json_response({"choices": [{"message": {"role": "assistant",
                                                           "content": text},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 9, "completion_tokens": 2,
                                            "total_tokens": 11}})


@pytest.fixture
async def fake_gateway() -> AsyncIterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_run_whose_worker_died_resumes_without_redoing_items(
        db: Database, fake_gateway: tuple[FakeGateway, str], tmp_path: Path) -> None:
    """A worker graded two of four items and died; the next one grades only the other two,
    through the gateway as the key that created the run, and completes the run."""
    fake, url = fake_gateway
    evals = Evals(db)
    files = Files(db, tmp_path, 1 << 20)
    ev = await new_eval(evals)
    content = [{"item": {"question": f"What is the capital of {c}?", "answer": "Paris"}}
               for c in ("France", "Spain", "France", "Peru")]
    source = {"type": "completions", "model": "chat", "source": {
        "type": "file_content", "content": content},
        "input_messages": {"type": "template", "template": [
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": "{{item.question}}"}]},
        "sampling_params": {"max_completion_tokens": 8, "temperature": 0}}
    run = await evals.create_run(ev, key_id="key_creator", name="r", model="chat",
                                 data_source=source, metadata={}, items_total=4)
    assert await evals.claim(run.id, "dead-worker", 0.2)
    assert await evals.record(run.id, "dead-worker", outcome(0, "pass"))
    assert await evals.record(run.id, "dead-worker", outcome(1, "fail"))
    await asyncio.sleep(0.3)  # its lease runs out

    settings = Settings(evals={"lease_s": 30, "heartbeat_s": 0.2, "concurrency": 2})

    def transport(r: Any, session: Any) -> GatewayTransport:
        return GatewayTransport(session, url, "sk-admin", r.key_id, concurrency=2,
                                attempts=2, embedding_model=None, request_prefix=r.id)

    assert await execute_run(run.id, evals, files, settings, transport) == "completed"
    done = await evals.get_run("ten_a", ev.id, run.id)
    assert done.status == "completed" and done.attempts == 2
    assert (done.passed, done.failed, done.errored) == (2, 2, 0)
    assert len(fake.requests) == 2  # items 2 and 3 only
    for headers, body in fake.requests:
        assert headers[ON_BEHALF_HEADER] == "key_creator"
        assert headers["authorization"] == "Bearer sk-admin"
        assert headers["x-request-id"].startswith(f"{run.id}.")
        assert body["messages"][0] == {"role": "system", "content": "Answer in one word."}
        assert (body["max_tokens"], body["temperature"]) == (8, 0)
    items, _ = await evals.list_items("ten_a", ev.id, run.id)
    third = items[2]
    assert third.status == "pass" and third.results[0]["passed"]
    assert third.sample["output"] == [{"role": "assistant", "content": "Paris"}]
    assert third.sample["usage"]["total_tokens"] == 11
    assert items[3].status == "fail"
    assert orjson.loads(orjson.dumps(third.datasource_item)) == content[2]["item"]


async def test_a_run_started_in_process_is_evaluated_inside_the_worker(
        db: Database, fake_gateway: tuple[FakeGateway, str], tmp_path: Path) -> None:
    """What fine-tune promotion does: a run checked and stored as any run, then run at once by
    the worker acting for the job's key, on the candidate adapter only such workers see."""
    fake, url = fake_gateway
    evals = Evals(db)
    files = Files(db, tmp_path, 1 << 20)
    ev = await new_eval(evals)
    catalog = Catalog([ModelConfig(name="chat", kind="chat",
                                   pools=[{"device": "cpu", "urls": [url]}])])
    catalog.set_adapters("chat", ["ft:chat:x:1"])
    catalog.owners["ft:chat:x:1"] = "ten_a"
    catalog.withheld.add("ft:chat:x:1")
    worker = Principal("key_job", "ten_a", "member", None, Limits(), Limits(), delegated=True)
    content = [{"item": {"question": f"What is the capital of {c}?", "answer": "Paris"}}
               for c in ("France", "Chile")]
    source = {"type": "completions", "source": {"type": "file_content", "content": content},
              "input_messages": {"type": "template", "template": [
                  {"role": "user", "content": "{{item.question}}"}]}}

    def transport(r: Any, session: Any) -> GatewayTransport:
        return GatewayTransport(session, url, "sk-admin", r.key_id, concurrency=2,
                                attempts=1, embedding_model=None, request_prefix=r.id)

    settings = Settings()
    starter = RunStarter(evals, files, catalog, settings.evals,
                         in_process(evals, files, settings, transport))
    started = await starter.start(worker, ev, parse_run(
        {"data_source": {**source, "model": "ft:chat:x:1"}}))
    run = await evals.get_run("ten_a", ev.id, started.id)
    assert (run.status, run.model, run.items_total) == ("completed", "ft:chat:x:1", 2)
    assert pass_ratios(run) == {"exact": 0.5}
    assert {body["model"] for _, body in fake.requests} == {"ft:chat:x:1"}
    assert {headers[ON_BEHALF_HEADER] for headers, _ in fake.requests} == {"key_job"}
