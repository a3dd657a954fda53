"""The Evals API in process, on a real SQLite store and the real Redis broker: every object it
answers validates as the official openai client's own type, and a tenant's queued and running
runs are bounded."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types import EvalCreateResponse
from openai.types.evals import RunCreateResponse
from openai.types.evals.runs import OutputItemListResponse

from evals.store import Evals, ItemOutcome
from llmops.settings import Settings
from llmops.store import Database
from tests.databases import in_process_gateway

ADMIN = "sk-unit-evals"
EVAL = {"name": "capitals", "metadata": {"suite": "unit"},
        "data_source_config": {"type": "custom", "include_sample_schema": True,
                               "item_schema": {"type": "object", "properties": {
                                   "q": {"type": "string"}, "a": {"type": "string"}}}},
        "testing_criteria": [{"type": "string_check", "name": "exact", "operation": "eq",
                              "input": "{{sample.output_text}}", "reference": "{{item.a}}"}]}
# An output item's sample as the worker writes it (evals.data.wire_sample).
WIRE_SAMPLE = {"input": [{"role": "user", "content": "France?"}],
               "output": [{"role": "assistant", "content": "Paris"}], "model": "chat",
               "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                                  "total_tokens": 4, "cached_tokens": 0},
               "error": None, "max_completion_tokens": 8, "seed": 1, "temperature": 0.0,
               "top_p": 1.0}
RUN = {"data_source": {"type": "jsonl", "source": {"type": "file_content", "content": [
    {"item": {"q": "France?", "a": "Paris"}, "sample": {"output_text": "Paris"}}]}}}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"}, evals={"max_active_runs": 2},
                        models=[{"name": "chat", "kind": "chat", "pools": [
                            {"device": "cpu", "urls": ["http://127.0.0.1:9"]}]}])
    async with in_process_gateway(settings, ADMIN) as client:
        yield client, settings


def openai_shape(payload: dict[str, Any], model: Any) -> None:
    """Strict validation as the client's own type (the client parses leniently). OpenAI's
    examples answer `"error": null` for a run without error, where the generated type has no
    room for null: that one null is filled in before validating."""
    if "error" in payload and payload["error"] is None:
        payload = {**payload, "error": {"code": "", "message": ""}}
    model.model_validate(payload)


async def test_objects_have_openais_shape(api: tuple[httpx.AsyncClient, Settings]) -> None:
    client, settings = api
    ev = (await client.post("/v1/evals", json=EVAL)).json()
    openai_shape(ev, EvalCreateResponse)
    run = (await client.post(f"/v1/evals/{ev['id']}/runs", json=RUN)).json()
    openai_shape(run, RunCreateResponse)
    assert run["status"] == "queued" and run["datasource_item_count"] == 1

    db = Database(settings.database_url)  # what a worker does, through the store
    try:
        evals = Evals(db)
        assert await evals.claim(run["id"], "w", 60)
        assert await evals.record(run["id"], "w", ItemOutcome(
            0, {"q": "France?", "a": "Paris"}, WIRE_SAMPLE,
            [{"name": "exact", "type": "string_check", "passed": True, "score": 1.0,
              "sample": None, "error": None, "detail": {}}], "pass",
            {"chat": {"invocation_count": 1, "prompt_tokens": 3, "completion_tokens": 1,
                      "total_tokens": 4, "cached_tokens": 0}}))
    finally:
        await db.close()
    run = (await client.get(f"/v1/evals/{ev['id']}/runs/{run['id']}")).json()
    openai_shape(run, RunCreateResponse)
    assert run["result_counts"] == {"total": 1, "passed": 1, "failed": 0, "errored": 0}
    assert run["per_testing_criteria_results"] == [
        {"testing_criteria": "exact", "passed": 1, "failed": 0, "errored": 0}]
    items = (await client.get(f"/v1/evals/{ev['id']}/runs/{run['id']}/output_items")).json()
    assert items["object"] == "list" and not items["has_more"]
    item = items["data"][0]
    sample = item["sample"]
    openai_shape({**item, "sample": {**sample, "error": {"code": "", "message": ""}}},
                 OutputItemListResponse)
    deleted = (await client.delete(f"/v1/evals/{ev['id']}")).json()
    assert deleted == {"object": "eval.deleted", "deleted": True, "eval_id": ev["id"]}


async def test_a_tenants_active_runs_are_bounded(api: tuple[httpx.AsyncClient, Settings]
                                                 ) -> None:
    client, _ = api
    ev = (await client.post("/v1/evals", json=EVAL)).json()
    runs = [(await client.post(f"/v1/evals/{ev['id']}/runs", json=RUN)).json()
            for _ in range(2)]
    refused = await client.post(f"/v1/evals/{ev['id']}/runs", json=RUN)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_eval_runs"
    canceled = await client.post(f"/v1/evals/{ev['id']}/runs/{runs[0]['id']}")  # OpenAI's way
    assert canceled.json()["status"] == "canceled"
    assert (await client.post(f"/v1/evals/{ev['id']}/runs", json=RUN)).status_code == 200


async def test_a_watch_is_refused_as_its_first_run_would_be(
        api: tuple[httpx.AsyncClient, Settings]) -> None:
    """A watch starts its first run the way every run starts: a fault is the run's, worded as
    the run's, but for the watch's own `model` field; nothing is left of a refused watch."""
    client, _ = api
    ev = (await client.post("/v1/evals", json=EVAL)).json()
    source = {"type": "file_content", "content": [{"item": {"q": "France?", "a": "Paris"}}]}
    data_source = {"type": "completions", "source": source, "input_messages": {
        "type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]}}
    body = {"name": "nightly", "model": "chat", "interval_s": 3600, "data_source": data_source}
    watches = f"/v1/evals/{ev['id']}/watches"
    bogus = {**data_source, "source": {"type": "bogus"}}
    missing = {**data_source, "source": {"type": "file_id", "id": "file-nope"}}
    for refused, status, param in (
            ({**body, "model": "nope"}, 404, "model"),
            ({**body, "data_source": bogus}, 400, "data_source.source.type"),
            ({**body, "data_source": missing}, 400, "data_source.source.id")):
        resp = await client.post(watches, json=refused)
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert error["param"] == param
        as_run = await client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": {
            **refused["data_source"], "model": refused["model"]}})
        assert as_run.status_code == status
        assert as_run.json()["error"] == {**error, "param": as_run.json()["error"]["param"]}
    assert (await client.get(watches)).json()["data"] == []
    assert (await client.get(f"/v1/evals/{ev['id']}/runs")).json()["data"] == []

    created = await client.post(watches, json=body)
    assert created.status_code == 200, created.text
    watch = created.json()
    assert watch["last_run"]["status"] == "queued"
    run = (await client.get(f"/v1/evals/{ev['id']}/runs/{watch['last_run']['id']}")).json()
    assert run["metadata"] == {"eval_watch_id": watch["id"], "eval_watch": "nightly"}


async def test_a_watchs_runs_are_its_trend(api: tuple[httpx.AsyncClient, Settings]) -> None:
    """`GET .../watches/{id}/runs`: the watch's own runs (not the eval's other runs), oldest
    first, each with the pass rates the watch object shows; another tenant's is missing."""
    client, settings = api
    ev = (await client.post("/v1/evals", json=EVAL)).json()
    other = (await client.post(f"/v1/evals/{ev['id']}/runs", json=RUN)).json()
    body = {"name": "trend", "model": "chat", "interval_s": 3600, "data_source": {
        "type": "completions", "source": RUN["data_source"]["source"], "input_messages": {
            "type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]}}}
    watch = (await client.post(f"/v1/evals/{ev['id']}/watches", json=body)).json()
    first = watch["last_run"]["id"]
    path = f"/v1/evals/{ev['id']}/watches/{watch['id']}/runs"

    db = Database(settings.database_url)  # the worker grades the watch's run
    try:
        evals = Evals(db)
        assert await evals.claim(first, "w", 60)
        assert await evals.record(first, "w", ItemOutcome(
            0, {"q": "France?", "a": "Paris"}, WIRE_SAMPLE,
            [{"name": "exact", "type": "string_check", "passed": True, "score": 1.0,
              "sample": None, "error": None, "detail": {}}], "pass", {}))
    finally:
        await db.close()
    trend = (await client.get(path)).json()
    assert trend["object"] == "list" and not trend["has_more"]
    assert [r["id"] for r in trend["data"]] == [first] != [other["id"]]
    [run] = trend["data"]
    assert run["pass_rate"] == 1.0 and run["per_testing_criteria"] == {"exact": 1.0}
    shown = (await client.get(f"/v1/evals/{ev['id']}/watches/{watch['id']}")).json()
    assert shown["last_run"] == run

    assert (await client.get(path, params={"limit": 0})).json()["error"]["param"] == "limit"
    tenant = (await client.post("/admin/tenants", json={"name": "stranger"})).json()
    key = (await client.post("/admin/keys", json={"tenant_id": tenant["id"]})).json()["key"]
    theirs = await client.get(path, headers={"Authorization": f"Bearer {key}"})
    assert theirs.status_code == 404 and theirs.json()["error"]["param"] == "eval_id"
