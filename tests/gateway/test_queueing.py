"""Work handed to the workers is never stranded. A broker that cannot take a task: the API
answers 503 in OpenAI's error shape and leaves nothing behind (in process, on a real SQLite
store and the embedded vector index, the broker pointed at a port where nothing listens). A
message lost before any worker claimed its job or run: the gateway sends it again, once, while
the queue is empty (real Redis broker and store)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
from redis.asyncio import Redis

from batches import Batches
from evals.store import Evals
from finetune.jobs import FineTuning
from gateway.app import create_app, services_of
from gateway.chores import requeue_orphans
from llmops.settings import Settings
from llmops.store import Database
from tests.databases import REDIS_URL, in_process_gateway
from tests.evals.test_store import new_eval
from workers.app import EVAL_QUEUE, FINETUNE_QUEUE, make_celery

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
        services_of(app).celery.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens

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


async def sent(redis: Redis, prefix: str, queue: str) -> list[str]:
    """The first argument of each message waiting in `queue` (Celery's JSON protocol)."""
    raw = await redis.lrange(f"{prefix}:celery:{queue}", 0, -1)
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw]


async def test_work_no_worker_claimed_is_sent_again_while_its_queue_is_empty(
        db: Database, redis: Redis, prefix: str) -> None:
    jobs, evals = FineTuning(db), Evals(db)
    celery = make_celery(Settings(redis_url=REDIS_URL, redis_prefix=prefix))
    job = await jobs.create(tenant_id="ten_a", key_id="k", model="chat", training_file="f")
    run = await evals.create_run(await new_eval(evals), key_id="k", name="r", model="chat",
                                 data_source={}, metadata={}, items_total=1)

    async def sweep() -> None:
        await requeue_orphans(jobs, evals, Batches(db), celery, redis, unclaimed_for=timedelta(0))

    await requeue_orphans(jobs, evals, Batches(db), celery, redis)  # just created: a minute's grace
    assert await sent(redis, prefix, FINETUNE_QUEUE) == await sent(redis, prefix,
                                                                   EVAL_QUEUE) == []
    await sweep()
    await sweep()  # its message is still waiting: not copied again
    assert await sent(redis, prefix, FINETUNE_QUEUE) == [job.id]
    assert await sent(redis, prefix, EVAL_QUEUE) == [run.id]
    await redis.delete(f"{prefix}:celery:{FINETUNE_QUEUE}")  # taken, then lost
    await sweep()
    assert await sent(redis, prefix, FINETUNE_QUEUE) == [job.id]
    await redis.delete(f"{prefix}:celery:{FINETUNE_QUEUE}")
    assert await jobs.claim(job.id, "worker", 60) is not None  # held: nothing to send
    await sweep()
    assert await sent(redis, prefix, FINETUNE_QUEUE) == []
