"""A broker that cannot take a task: the API answers 503 in OpenAI's error shape and leaves
nothing behind that no worker will ever pick up. In process, on a real SQLite store and the
embedded vector index, with the broker pointed at a port where nothing listens."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx

from gateway.app import create_app
from llmops.settings import Settings
from tests.store.conftest import REDIS_URL, in_process_gateway

ADMIN = "sk-unit-queue-down"
DEAD = "http://127.0.0.1:9"  # no engine is called
EVAL = {"name": "capitals", "data_source_config": {"type": "custom", "item_schema": {
    "type": "object", "properties": {"q": {"type": "string"}}}},
    "testing_criteria": [{"type": "string_check", "name": "exact", "operation": "eq",
                          "input": "{{sample.output_text}}", "reference": "Paris"}]}
RUN = {"data_source": {"type": "jsonl", "source": {"type": "file_content", "content": [
    {"item": {"q": "France?"}, "sample": {"output_text": "Paris"}}]}}}
EXAMPLE = {"messages": [{"role": "user", "content": "Capital of France?"},
                        {"role": "assistant", "content": "Paris."}]}


def settings(tmp_path: Path) -> Settings:
    return Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                    redis_url=REDIS_URL, redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                    files={"root": tmp_path / "files"}, retrieval={"path": tmp_path / "qdrant"},
                    models=[{"name": "chat", "kind": "chat", "weights": str(tmp_path),
                             "pools": [{"device": "cpu", "urls": [DEAD]}]},
                            {"name": "embed", "kind": "embedding",
                             "pools": [{"device": "cpu", "urls": [DEAD]}]}])


def unavailable(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error",
                                                              "service_unavailable", None)
    assert "queue is unavailable" in error["message"]
    assert "127.0.0.1" not in error["message"]  # the broker's address stays in the log


async def test_nothing_is_left_queued_when_the_broker_is_down(tmp_path: Path) -> None:
    config = settings(tmp_path)
    app = create_app(config)
    async with in_process_gateway(config, ADMIN, app) as client:
        train = await client.post("/v1/files", data={"purpose": "fine-tune"}, files={
            "file": ("train.jsonl", (json.dumps(EXAMPLE) + "\n").encode() * 10)})
        doc = await client.post("/v1/files", data={"purpose": "assistants"},
                                files={"file": ("kettle.txt", b"A seven-year warranty.")})
        ev = await client.post("/v1/evals", json=EVAL)
        assert {train.status_code, doc.status_code, ev.status_code} == {200}
        app.state.celery.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens

        unavailable(await client.post("/v1/fine_tuning/jobs", json={
            "model": "chat", "training_file": train.json()["id"]}))
        assert (await client.get("/v1/fine_tuning/jobs")).json()["data"] == []

        eval_id = ev.json()["id"]
        unavailable(await client.post(f"/v1/evals/{eval_id}/runs", json=RUN))
        assert (await client.get(f"/v1/evals/{eval_id}/runs")).json()["data"] == []

        # A file attach is a status, as for a file that cannot be read: failed, saying why.
        store = await client.post("/v1/vector_stores", json={
            "name": "manuals", "file_ids": [doc.json()["id"]]})
        assert store.status_code == 200, store.text
        attached = (await client.get(
            f"/v1/vector_stores/{store.json()['id']}/files/{doc.json()['id']}")).json()
        assert attached["status"] == "failed"
        assert attached["last_error"]["code"] == "server_error"
        assert "Attach the file again" in attached["last_error"]["message"]
