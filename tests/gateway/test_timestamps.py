"""Times in API objects are epoch seconds in UTC whatever the machine's zone: SQLite (the
embedded default store) hands stored times back without their zone, and reading them as local
time put every `created_at` hours off. The API in process, on SQLite, in New York."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmops.settings import Settings
from tests.databases import REDIS_URL, in_process_gateway

ADMIN = "sk-unit-timestamps"
DEAD = "http://127.0.0.1:9"  # no engine is called
EXAMPLE = {"messages": [{"role": "user", "content": "Capital of France?"},
                        {"role": "assistant", "content": "Paris."}]}
EVAL = {"name": "capitals", "data_source_config": {"type": "custom", "item_schema": {
    "type": "object", "properties": {"q": {"type": "string"}}}},
    "testing_criteria": [{"type": "string_check", "name": "exact", "operation": "eq",
                          "input": "{{sample.output_text}}", "reference": "Paris"}]}
ITEMS = {"type": "file_content", "content": [{"item": {"q": "France?"}}]}


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def now(value: object) -> None:
    """`value` is epoch seconds of a moment ago."""
    assert isinstance(value, int) and abs(value - time.time()) < 10, value


def ok(resp: httpx.Response) -> dict[str, object]:
    assert resp.status_code == 200, resp.text
    body: dict[str, object] = resp.json()
    return body


async def test_created_at_is_utc_epoch_seconds_in_any_zone(new_york: None, tmp_path: Path
                                                           ) -> None:
    assert time.localtime().tm_gmtoff != 0  # the zone the bug showed in
    settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        redis_url=REDIS_URL, redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        retrieval={"path": tmp_path / "qdrant"},
                        models=[{"name": "chat", "kind": "chat", "weights": str(tmp_path),
                                 "pools": [{"device": "cpu", "urls": [DEAD]}]},
                                {"name": "embed", "kind": "embedding",
                                 "pools": [{"device": "cpu", "urls": [DEAD]}]}])
    async with in_process_gateway(settings, ADMIN) as client:
        train = ok(await client.post("/v1/files", data={"purpose": "fine-tune"}, files={
            "file": ("train.jsonl", (json.dumps(EXAMPLE) + "\n").encode() * 10)}))
        now(train["created_at"])
        now(ok(await client.get(f"/v1/files/{train['id']}"))["created_at"])

        store = ok(await client.post("/v1/vector_stores", json={
            "name": "manuals", "file_ids": [train["id"]]}))
        now(store["created_at"])
        now(store["last_active_at"])
        attached = ok(await client.get(f"/v1/vector_stores/{store['id']}/files/{train['id']}"))
        now(attached["created_at"])

        ev = ok(await client.post("/v1/evals", json=EVAL))
        now(ev["created_at"])
        run = ok(await client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": {
            "type": "jsonl", "source": {"type": "file_content", "content": [
                {"item": {"q": "France?"}, "sample": {"output_text": "Paris"}}]}}}))
        now(run["created_at"])
        watch = ok(await client.post(f"/v1/evals/{ev['id']}/watches", json={
            "name": "nightly", "model": "chat", "interval_s": 3600, "data_source": {
                "type": "completions", "source": ITEMS, "input_messages": {
                    "type": "template", "template": [
                        {"role": "user", "content": "{{item.q}}"}]}}}))
        now(watch["created_at"])
        assert isinstance(watch["last_run"], dict)
        now(watch["last_run"]["created_at"])
        assert watch["next_run_at"] == watch["created_at"] + 3600

        job = ok(await client.post("/v1/fine_tuning/jobs", json={
            "model": "chat", "training_file": train["id"]}))
        now(job["created_at"])
        events = ok(await client.get(f"/v1/fine_tuning/jobs/{job['id']}/events"))["data"]
        assert isinstance(events, list) and events
        now(events[0]["created_at"])
