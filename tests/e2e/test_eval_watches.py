"""A regression watch end to end, on a gateway of its own (a one-second interval floor): an eval
made with the official openai client, a watch made over HTTP whose first run starts at once,
the gateway's scheduler starting the next runs by itself (never one while the previous one
runs) for a real Celery eval worker sampling the base model through the gateway, the pass
ratio and the accepted run's in `/metrics`, another run accepted, and no run once the watch
is disabled."""

from __future__ import annotations

import itertools
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from prometheus_client.parser import text_string_to_metric_families

from llmops.cli.stack import CHAT_MODEL, Service, free_port
from tests.clients import EVALS_API
from tests.e2e.conftest import (
    Engines,
    Gateway,
    GatewayFactory,
    Running,
    standard_models,
    start,
    wait_healthy,
)
from tests.e2e.test_evals import client_for, new_key, wait_until

pytestmark = EVALS_API

ITEMS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")]
INTERVAL_S = 3
DATA_SOURCE: dict[str, Any] = {
    "type": "completions",
    "input_messages": {"type": "template", "template": [
        {"role": "developer", "content": "Answer with the city's name only."},
        {"role": "user", "content": "What is the capital of {{item.country}}?"}]},
    "sampling_params": {"temperature": 0, "max_completion_tokens": 8}}


@pytest.fixture(scope="module")
def watched(engines: Engines, gateway_factory: GatewayFactory) -> Gateway:
    gw = gateway_factory(standard_models(engines),
                         eval_watches={"min_interval_s": 1, "poll_s": 0.5},
                         metrics={"refresh_s": 0.5})
    wait_until(lambda: httpx.get(f"{gw.url}/readyz").status_code == 200, 30, "ready")
    return gw


@pytest.fixture(scope="module")
def evaluator(watched: Gateway, logs: Path) -> Iterator[Running]:
    port = free_port()
    worker = start(Service("watch-evaluator", [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "eval",
        "--pool", "threads", "--concurrency", "2", "--loglevel", "info",
        "-n", f"watch-{uuid.uuid4().hex[:6]}@%h"], port, "/metrics",
        {"LLMOPS_CONFIG": str(watched.config),
         "LLMOPS_PORT": str(watched.running.service.port),
         "LLMOPS_METRICS__WORKER_PORT": str(port), "LLMOPS_EVALS__HEARTBEAT_S": "0.5"}), logs)
    wait_healthy([worker], timeout_s=120)
    yield worker
    worker.stop()


def gauges(gw: Gateway, watch: str) -> dict[tuple[str, str], float]:
    """The watch's eval gauges in the gateway's /metrics: {(name, tenant): value}."""
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    return {(s.name, s.labels["tenant"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("llmops_eval_") and s.labels.get("watch") == watch}


def watch_runs(gw: Gateway, eval_id: str) -> list[Any]:
    """The eval's runs as the store has them, oldest first."""
    engine = sqlalchemy.create_engine(gw.settings["database_url"])
    try:
        with engine.connect() as conn:
            return list(conn.execute(sqlalchemy.text(
                "SELECT id, status, created_at, finished_at, metadata FROM eval_runs "
                "WHERE eval_id = :e ORDER BY created_at"), {"e": eval_id}))
    finally:
        engine.dispose()


def param_of(resp: httpx.Response, status: int = 400) -> str | None:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]["param"]  # type: ignore[no-any-return]


@pytest.mark.timeout(300)
def test_a_watch_runs_on_schedule_exports_pass_ratios_and_stops_when_disabled(
        watched: Gateway, evaluator: Running) -> None:
    with httpx.Client(base_url=watched.url, headers=watched.headers, timeout=60) as admin:
        key = new_key(admin)
        stranger = new_key(admin)
    tenant = key["tenant_id"]
    client = client_for(watched, key["key"])
    data = "".join(json.dumps({"item": {"country": c, "answer": a}}) + "\n" for c, a in ITEMS)
    upload = client.files.create(file=("capitals.jsonl", data.encode()), purpose="evals")
    ev = client.evals.create(
        name="capitals", testing_criteria=[{  # type: ignore[list-item]
            "type": "string_check", "name": "names the capital", "operation": "ilike",
            "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}],
        data_source_config={"type": "custom", "include_sample_schema": True, "item_schema": {
            "type": "object", "required": ["country", "answer"],
            "properties": {"country": {"type": "string"}, "answer": {"type": "string"}}}})
    with httpx.Client(base_url=f"{watched.url}/v1/evals/{ev.id}", timeout=60,
                      headers={"Authorization": f"Bearer {key['key']}"}) as api:
        body = {"name": "capitals", "model": CHAT_MODEL, "interval_s": INTERVAL_S,
                "min_pass_rate": 0.5, "tolerance": 0.1,
                "data_source": {**DATA_SOURCE, "source": {"type": "file_id", "id": upload.id}}}

        # Refused as a run would be, naming the field; nothing is left behind.
        missing = {**body["data_source"], "source": {"type": "file_id", "id": "file-nope"}}
        assert param_of(api.post("/watches", json={**body, "data_source": missing})) \
            == "data_source.source.id"
        assert param_of(api.post("/watches", json={**body, "model": "nope"}), 404) == "model"
        assert param_of(api.post("/watches", json={**body, "interval_s": 0})) == "interval_s"
        assert api.get("/watches").json()["data"] == []

        created = api.post("/watches", json=body)
        assert created.status_code == 200, created.text
        watch = created.json()
        path = f"/watches/{watch['id']}"
        assert watch["object"] == "eval.watch" and watch["enabled"]
        assert watch["last_run"]["status"] in ("queued", "in_progress", "completed")
        assert api.post("/watches", json=body).status_code == 409  # the name is taken
        theirs = httpx.get(f"{watched.url}/v1/evals/{ev.id}{path}",
                           headers={"Authorization": f"Bearer {stranger['key']}"})
        assert theirs.status_code == 404

        # The scheduler starts runs by itself, one at a time; the first completed is accepted.
        def completed_runs() -> list[Any]:
            runs = [r for r in watch_runs(watched, ev.id) if r.status == "completed"]
            return runs if len(runs) >= 3 else []

        completed = wait_until(completed_runs, 120, "three completed runs of the watch")
        runs = watch_runs(watched, ev.id)
        assert {json.loads(r.metadata)["eval_watch_id"] for r in runs} == {watch["id"]}
        for before, after in itertools.pairwise(runs):  # never two at once
            assert before.finished_at is not None and after.created_at >= before.finished_at
        now = api.get(path).json()
        assert now["accepted_run"]["id"] == completed[0].id
        assert now["pass_rate"] is not None and 0 <= now["pass_rate"] <= 1

        # The gauges, labelled by this tenant (busy with the runs' requests) and the watch.
        figures = wait_until(
            lambda: (g := gauges(watched, "capitals"))
            .get(("llmops_eval_accepted_pass_ratio", tenant)) is not None and g,
            30, "the watch's gauges")
        assert figures[("llmops_eval_accepted_pass_ratio", tenant)] == now["accepted_pass_rate"]
        assert 0 <= figures[("llmops_eval_pass_ratio", tenant)] <= 1
        assert 0 <= figures[("llmops_eval_criterion_pass_ratio", tenant)] <= 1
        assert figures[("llmops_eval_min_pass_ratio", tenant)] == 0.5
        assert figures[("llmops_eval_tolerance_ratio", tenant)] == 0.1
        assert figures[("llmops_eval_interval_seconds", tenant)] == INTERVAL_S

        # Accept another completed run; an unknown one is refused.
        assert param_of(api.post(path, json={"accepted_run_id": "evalrun_nope"})) \
            == "accepted_run_id"
        accepted = api.post(path, json={"accepted_run_id": completed[-1].id})
        assert accepted.status_code == 200
        assert accepted.json()["accepted_run"]["id"] == completed[-1].id

        # Disabled: the run in flight ends, no run starts after it, and its gauges go.
        off = api.post(path, json={"enabled": False}).json()
        assert off["enabled"] is False and off["next_run_at"] is None
        time.sleep(1)  # a run whose start was under way as the watch was disabled shows up
        wait_until(lambda: all(r.status in ("completed", "failed", "canceled")
                               for r in watch_runs(watched, ev.id)), 60, "the last run ends")
        count = len(watch_runs(watched, ev.id))
        wait_until(lambda: not gauges(watched, "capitals"), 10, "the gauges gone")
        time.sleep(3 * INTERVAL_S)
        assert len(watch_runs(watched, ev.id)) == count

        assert api.delete(path).json()["deleted"] is True
        assert api.get(path).status_code == 404
