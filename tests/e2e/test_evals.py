"""Evals end to end with the official openai client: an eval with a string_check and a cosine
text_similarity criterion, run against the base chat model by a real Celery eval worker that
samples and embeds through the gateway as the tenant's key (its calls land in that tenant's
ledger), per-item output, a jsonl run that grades given samples, cancellation of a running
run, tenant isolation, refused criteria and data sources, and acting on behalf of a key."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy
from openai import OpenAI
from playwright.sync_api import expect

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL, Service, free_port
from tenancy.tenants import ON_BEHALF_HEADER
from tests.browser import Console
from tests.clients import EVALS_API
from tests.e2e.conftest import API_KEY, Gateway, Running, start, wait_healthy, wait_until

pytestmark = EVALS_API

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Spain", "Madrid")]
ITEM_SCHEMA = {"type": "object", "required": ["question", "answer"], "properties": {
    "question": {"type": "string"}, "answer": {"type": "string"},
    "country": {"type": "string"}}}
CRITERIA: list[dict[str, Any]] = [
    {"type": "string_check", "name": "names the capital", "input": "{{sample.output_text}}",
     "reference": "{{item.answer}}", "operation": "ilike"},
    {"type": "text_similarity", "name": "close to the reference", "evaluation_metric": "cosine",
     "input": "{{sample.output_text}}", "pass_threshold": 0.5,
     "reference": "The capital of {{item.country}} is {{item.answer}}."},
]
TEMPLATE = [{"role": "developer", "content": "Answer in one short sentence."},
            {"role": "user", "content": "{{item.question}}"}]


def item(country: str, capital: str) -> dict[str, str]:
    return {"question": f"What is the capital of {country}?", "answer": capital,
            "country": country}


@pytest.fixture(scope="module")
def evaluator(gateway: Gateway, logs: Any) -> Iterator[Running]:
    port = free_port()
    worker = start(Service("evaluator", [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "eval",
        "--pool", "threads", "--concurrency", "2", "--loglevel", "info",
        "-n", f"eval-{uuid.uuid4().hex[:6]}@%h"], port, "/metrics",
        {"LLMOPS_CONFIG": str(gateway.config), "LLMOPS_PORT": str(gateway.running.service.port),
         "LLMOPS_METRICS__WORKER_PORT": str(port), "LLMOPS_EVALS__HEARTBEAT_S": "0.5",
         "LLMOPS_EVALS__CONCURRENCY": "4"}), logs)
    wait_healthy([worker], timeout_s=120)  # its /metrics answer once it started
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def admin(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as client:
        yield client


def new_key(admin: httpx.Client) -> dict[str, Any]:
    tenant = admin.post("/admin/tenants", json={"name": f"evals-{uuid.uuid4().hex[:8]}"})
    assert tenant.status_code == 201, tenant.text
    key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"]})
    assert key.status_code == 201, key.text
    return dict(key.json())


def client_for(gateway: Gateway, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=60)


def create_eval(client: OpenAI, criteria: list[dict[str, Any]] = CRITERIA) -> Any:
    return client.evals.create(
        name="capitals", metadata={"suite": "smoke"}, testing_criteria=criteria,  # type: ignore[arg-type]
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA,
                            "include_sample_schema": True})


def ledger(gateway: Gateway, run_id: str) -> list[Any]:
    engine = sqlalchemy.create_engine(gateway.settings["database_url"])
    try:
        with engine.connect() as conn:
            return list(conn.execute(sqlalchemy.text(
                "SELECT tenant_id, key_id, model, status FROM usage_records "
                "WHERE request_id LIKE :run"), {"run": f"{run_id}.%"}))
    finally:
        engine.dispose()


@pytest.mark.timeout(300)
def test_an_eval_run_grades_the_base_model_through_the_gateway(
        gateway: Gateway, evaluator: Running, admin: httpx.Client) -> None:
    key = new_key(admin)
    client = client_for(gateway, key["key"])
    data = "".join(json.dumps({"item": item(c, a)}) + "\n" for c, a in CAPITALS)
    upload = client.files.create(file=("capitals.jsonl", data.encode()), purpose="evals")
    ev = create_eval(client)
    assert ev.object == "eval" and [c.name for c in ev.testing_criteria] == [
        c["name"] for c in CRITERIA]
    assert ev.data_source_config.schema_["properties"]["item"] == ITEM_SCHEMA

    run = client.evals.runs.create(ev.id, name="base", data_source={
        "type": "completions", "model": CHAT_MODEL,
        "source": {"type": "file_id", "id": upload.id},
        "input_messages": {"type": "template", "template": TEMPLATE},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 16}})
    assert run.object == "eval.run" and run.status == "queued" and run.model == CHAT_MODEL
    done = wait_until(lambda: (r := client.evals.runs.retrieve(run.id, eval_id=ev.id))
                      .status in ("completed", "failed", "canceled") and r, 120, "run done")
    assert done.status == "completed", done.error
    counts = done.result_counts
    assert counts.total == len(CAPITALS) == counts.passed + counts.failed + counts.errored
    assert counts.errored == 0
    per = {r.testing_criteria: r for r in done.per_testing_criteria_results}
    assert list(per) == [c["name"] for c in CRITERIA]
    assert all(r.passed + r.failed == len(CAPITALS) for r in per.values())
    usage = {u.run_model_name: u for u in done.per_model_usage}
    assert usage[CHAT_MODEL].invocation_count == len(CAPITALS)
    assert 0 < usage[CHAT_MODEL].completion_tokens <= 16 * len(CAPITALS)
    assert usage[EMBEDDING_MODEL].invocation_count == len(CAPITALS)  # one cosine per item

    items = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=2))
    assert [i.datasource_item_id for i in items] == list(range(len(CAPITALS)))  # paged by 2
    for output, (country, capital) in zip(items, CAPITALS, strict=True):
        assert output.object == "eval.run.output_item" and output.run_id == run.id
        assert output.datasource_item == item(country, capital)
        assert [r.name for r in output.results] == [c["name"] for c in CRITERIA]
        answer = output.sample.output[0].content or ""
        assert answer and output.sample.model == CHAT_MODEL
        assert output.sample.input[-1].content == f"What is the capital of {country}?"
        assert output.sample.usage.total_tokens > 0
        assert output.results[0].passed == (capital.casefold() in answer.casefold())
        assert output.status == ("pass" if all(r.passed for r in output.results) else "fail")
    france = client.evals.runs.output_items.retrieve(items[0].id, eval_id=ev.id, run_id=run.id)
    assert france.results[0].passed, france.sample.output  # "The capital of France is Paris."

    # Every model call of the run is in the ledger, under the tenant and key that created it.
    rows = wait_until(lambda: (r := ledger(gateway, run.id)) and len(r) == 2 * len(CAPITALS)
                      and all(x.status for x in r) and r, 30, "final ledger rows")
    assert {(r.tenant_id, r.key_id, r.status) for r in rows} == {
        (key["tenant_id"], key["id"], 200)}
    assert sorted(r.model for r in rows) == sorted([CHAT_MODEL, EMBEDDING_MODEL] * len(CAPITALS))

    # Another tenant sees none of it.
    stranger = client_for(gateway, new_key(admin)["key"])
    for call in (lambda: stranger.evals.retrieve(ev.id),
                 lambda: stranger.evals.runs.retrieve(run.id, eval_id=ev.id),
                 lambda: stranger.evals.runs.output_items.list(run.id, eval_id=ev.id),
                 lambda: stranger.evals.runs.cancel(run.id, eval_id=ev.id),
                 lambda: stranger.evals.delete(ev.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [e.id for e in stranger.evals.list()] == []
    assert ev.id in [e.id for e in client.evals.list()]
    assert [r.id for r in client.evals.runs.list(ev.id)] == [run.id]

    # The CLI reads the same run.
    shown = subprocess.run(
        [sys.executable, "-m", "llmops.cli", "evals", "show", ev.id, run.id, "--items",
         "--base-url", gateway.base_url, "--api-key", key["key"]],
        capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert f"{counts.passed} passed, {counts.failed} failed, 0 errored of 5" in shown.stdout
    assert "names the capital:" in shown.stdout and f"{CHAT_MODEL}: 5 calls" in shown.stdout
    assert shown.stdout.count("  item ") == len(CAPITALS)


@pytest.mark.timeout(300)
def test_jsonl_runs_grade_given_samples_and_a_running_run_can_be_canceled(
        gateway: Gateway, evaluator: Running, admin: httpx.Client) -> None:
    client = client_for(gateway, new_key(admin)["key"])
    ev = create_eval(client, CRITERIA[:1])
    given = [{"item": item("France", "Paris"), "sample": {"output_text": "It is Paris."}},
             {"item": item("Japan", "Tokyo"), "sample": {"output_text": "Kyoto, I think."}}]
    run = client.evals.runs.create(ev.id, data_source={
        "type": "jsonl", "source": {"type": "file_content", "content": given}})
    done = wait_until(lambda: (r := client.evals.runs.retrieve(run.id, eval_id=ev.id))
                      .status == "completed" and r, 60, "jsonl run done")
    assert (done.result_counts.passed, done.result_counts.failed) == (1, 1)
    assert done.per_model_usage == []  # nothing was sampled
    failing = client.evals.runs.output_items.list(run.id, eval_id=ev.id, status="fail").data
    assert [i.datasource_item_id for i in failing] == [1]

    many = [{"item": item(f"Country {i}", "Nowhere")} for i in range(30)]
    slow = client.evals.runs.create(ev.id, data_source={
        "type": "completions", "model": CHAT_MODEL,
        "source": {"type": "file_content", "content": many},
        "input_messages": {"type": "template", "template": TEMPLATE},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 48}})
    wait_until(lambda: client.evals.runs.retrieve(slow.id, eval_id=ev.id)
               .result_counts.total > 0, 60, "first item graded")
    asked = client.evals.runs.cancel(slow.id, eval_id=ev.id)
    assert asked.status in ("in_progress", "canceled")
    canceled = wait_until(lambda: (r := client.evals.runs.retrieve(slow.id, eval_id=ev.id))
                          .status == "canceled" and r, 15, "run canceled")
    assert 0 < canceled.result_counts.total < len(many)
    kept = canceled.result_counts.total
    time.sleep(1.5)  # its worker stopped: nothing more is graded
    assert client.evals.runs.retrieve(slow.id, eval_id=ev.id).result_counts.total == kept
    with pytest.raises(openai.BadRequestError):
        client.evals.runs.cancel(slow.id, eval_id=ev.id)  # canceled already
    assert client.evals.runs.delete(slow.id, eval_id=ev.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(slow.id, eval_id=ev.id)
    assert client.evals.delete(ev.id).deleted


def test_bad_criteria_and_unsupported_sources_are_refused_by_name(gateway: Gateway,
                                                                  admin: httpx.Client) -> None:
    client = client_for(gateway, new_key(admin)["key"])
    bad = [{**CRITERIA[0], "operation": "contains"}]
    with pytest.raises(openai.BadRequestError) as refused:
        create_eval(client, bad)
    assert refused.value.body["param"] == "testing_criteria[0].operation"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.evals.create(data_source_config={"type": "logs"}, testing_criteria=CRITERIA)  # type: ignore[arg-type]
    assert refused.value.body["param"] == "data_source_config.type"  # type: ignore[index]

    ev = create_eval(client)
    source = {"type": "file_content", "content": [{"item": {"question": "Why?"}}]}
    with pytest.raises(openai.BadRequestError) as refused:  # no answer: the schema wants one
        client.evals.runs.create(ev.id, data_source={
            "type": "completions", "model": CHAT_MODEL, "source": source,
            "input_messages": {"type": "template", "template": TEMPLATE}})
    assert "item_schema" in refused.value.message
    fine = {"type": "file_content", "content": [{"item": item("Peru", "Lima")}]}
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.create(ev.id, data_source={
            "type": "completions", "model": "no-such-model", "source": fine,
            "input_messages": {"type": "template", "template": TEMPLATE}})
    with pytest.raises(openai.BadRequestError) as refused:
        client.evals.runs.create(ev.id, data_source={
            "type": "completions", "model": CHAT_MODEL, "source": fine,
            "input_messages": {"type": "template", "template": [
                {"role": "user", "content": "{{item.nationality}}"}]}})
    assert refused.value.body["param"] == (  # type: ignore[index]
        "data_source.input_messages.template[0].content")


def test_only_admin_keys_act_on_behalf_of_usable_keys(gateway: Gateway,
                                                      admin: httpx.Client) -> None:
    key = new_key(admin)

    def models(bearer: str, acting_for: str) -> httpx.Response:
        return httpx.get(f"{gateway.base_url}/models", timeout=30, headers={
            "Authorization": f"Bearer {bearer}", ON_BEHALF_HEADER: acting_for})

    assert models(API_KEY, key["id"]).status_code == 200
    assert models(key["key"], key["id"]).status_code == 403  # a member key may not
    assert admin.post(f"/admin/keys/{key['id']}/revoke").status_code == 200
    refused = wait_until(lambda: (r := models(API_KEY, key["id"])).status_code != 200 and r,
                         5, "revocation seen")
    assert refused.status_code == 401
    assert models(API_KEY, "key_unknown").status_code == 401


def test_the_cli_lists_evals_without_the_clients_deprecation_warning(
        gateway: Gateway, admin: httpx.Client) -> None:
    key = new_key(admin)["key"]
    ev = create_eval(client_for(gateway, key))
    shown = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-m", "llmops.cli", "evals", "list",
         "--base-url", gateway.base_url, "--api-key", key],
        capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert ev.id in shown.stdout and "capitals" in shown.stdout
    assert "deprecated" not in shown.stderr


@pytest.mark.timeout(300)
def test_the_console_shows_a_runs_pass_rates_items_and_a_watchs_trend(
        gateway: Gateway, evaluator: Running, console: Callable[..., Console]) -> None:
    """The evals page shows each criterion's pass rate as the API's run object has it, the
    run's items with their verdicts, and a watch's pass rate over its runs."""
    client = client_for(gateway, API_KEY)
    ev = create_eval(client, CRITERIA[:1])
    given = [{"item": item("France", "Paris"), "sample": {"output_text": "Paris."}},
             {"item": item("Japan", "Tokyo"), "sample": {"output_text": "Kyoto."}},
             {"item": item("Italy", "Rome"), "sample": {"output_text": "It is Rome."}}]
    run = client.evals.runs.create(ev.id, name="given", data_source={
        "type": "jsonl", "source": {"type": "file_content", "content": given}})
    done = wait_until(lambda: (r := client.evals.runs.retrieve(run.id, eval_id=ev.id))
                      .status == "completed" and r, 60, "jsonl run done")
    watches = f"{gateway.base_url}/evals/{ev.id}/watches"
    watch = httpx.post(watches, headers=gateway.headers, timeout=60, json={
        "name": f"console-{uuid.uuid4().hex[:8]}", "model": CHAT_MODEL, "interval_s": 3600,
        "data_source": {"type": "completions", "source": {"type": "file_content", "content": [
            {"item": item("Spain", "Madrid")}]}, "input_messages": {
            "type": "template", "template": TEMPLATE},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 8}}}).json()
    trend = wait_until(lambda: (r := httpx.get(f"{watches}/{watch['id']}/runs",
                                               headers=gateway.headers, timeout=30).json())
                       ["data"][0]["status"] == "completed" and r, 60, "the watch's run")

    tab = console(gateway.url)
    tab.sign_in(API_KEY)
    page = tab.open(f"evals?eval={ev.id}")
    row = page.locator("#runs tbody tr", has=page.locator(f'button[data-run="{run.id}"]'))
    for result in done.per_testing_criteria_results:
        total = result.passed + result.failed + result.errored
        cell = row.locator(f'.rate[data-criterion="{result.testing_criteria}"]')
        expect(cell).to_have_text(f"{result.passed}/{total} ({100 * result.passed / total:.1f}%)")
    assert (done.result_counts.passed, done.result_counts.total) == (2, 3)
    row.locator("button").click()
    items = page.locator("#items tbody tr")
    expect(items).to_have_count(len(given))
    assert items.nth(1).locator(".badge").first.inner_text() == "fail"
    assert "Kyoto." in items.nth(1).inner_text()
    chart = page.locator('#watch-charts path[data-series="all criteria"]')
    expect(chart).to_have_attribute("data-points", str(len(trend["data"])))
    expect(page.locator("#watches tbody tr")).to_contain_text(watch["name"])
    tab.screenshot("evals")
    docs = Path(__file__).resolve().parents[2] / "docs" / "console"
    docs.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(docs / "evals.png"), full_page=False)
    assert httpx.delete(f"{watches}/{watch['id']}", headers=gateway.headers,
                        timeout=30).json()["deleted"]
