"""Running batches (`batches.run`) on SQLite and PostgreSQL, with the gateway replaced by a
recording sender: answers land in output and error files in OpenAI's line format, each line
once; a batch whose worker died resumes without sending a line twice; a cancel stops it within
a heartbeat and keeps what was answered; an expired batch lists what never ran; a deleted
tenant's batches go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select, update

from batches.run import Send, execute_batch
from batches.store import Answer, Batches
from batches.validation import BatchLine
from llmops.files import Files
from llmops.settings import BatchesConfig
from llmops.store import Batch, BatchRequest, Database, utcnow

URL = "/v1/chat/completions"
CONFIG = BatchesConfig(concurrency=2, heartbeat_s=0.05, lease_s=5)


def request(custom_id: str, text: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": URL,
            "body": {"model": "chat", "messages": [{"role": "user", "content": text}]}}


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Gateway:
    """Answers each line (a text of 'fail' gets a 400); `hold` keeps lines from the given
    one on waiting until released."""

    def __init__(self, hold_from: int | None = None) -> None:
        self.seen: list[str] = []
        self.hold_from = hold_from
        self.release = asyncio.Event()

    def __call__(self, batch: Batch, session: Any) -> Send:
        async def send(line: BatchLine) -> tuple[Answer, str]:
            self.seen.append(line.custom_id)
            if self.hold_from is not None and line.line >= self.hold_from:
                await self.release.wait()
            text = orjson.loads(line.body)["messages"][0]["content"]
            rid = f"{batch.id}.{line.line}"
            if text == "fail":
                return Answer(400, {"error": {"message": "no", "type": "invalid_request_error",
                                              "param": "max_tokens", "code": None}}), rid
            answer: dict[str, Any] = {"object": "chat.completion", "echo": text}
            if text == "long":
                answer["padding"] = "x" * 600
            return Answer(200, answer), rid
        return send


@pytest.fixture
def files(db: Database, tmp_path: Path) -> Files:
    return Files(db, tmp_path / "files", 4096)  # the upload limit: outputs are not bound by it


async def new_batch(db: Database, files: Files, lines: list[dict[str, Any]],
                    window: timedelta = timedelta(hours=24)) -> Batch:
    data = b"".join(orjson.dumps(r) + b"\n" for r in lines)
    stored = await files.create("ten_a", "in.jsonl", "batch", chunks(data))
    return await Batches(db).create(tenant_id="ten_a", key_id="key_a", endpoint=URL,
                                    input_file_id=stored.id, completion_window="24h",
                                    window=window, metadata=None, total=len(lines),
                                    errors=None)


async def read(files: Files, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    row = await files.get("ten_a", file_id)
    assert row.purpose == "batch_output"
    return [orjson.loads(x) for x in files.path(row).read_bytes().splitlines()]


async def test_answers_go_to_output_and_error_files_in_openai_format(
        db: Database, files: Files) -> None:
    batch = await new_batch(db, files, [request("a", "one"), request("b", "fail"),
                                        request("c", "three")])
    gateway = Gateway()
    assert await execute_batch(batch.id, Batches(db), files, CONFIG, gateway) == "completed"
    done = await Batches(db).get("ten_a", batch.id)
    assert done.status == "completed" and done.lease_owner is None
    assert (done.total, done.completed, done.failed) == (3, 2, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    output = await read(files, done.output_file_id)
    assert [(o["custom_id"], o["response"]["status_code"], o["response"]["body"]["echo"])
            for o in output] == [("a", 200, "one"), ("c", 200, "three")]
    assert all(o["error"] is None and o["id"].startswith("batch_req_") for o in output)
    assert output[0]["response"]["request_id"] == f"{batch.id}.1"
    errors = await read(files, done.error_file_id)
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("b", 400)]
    assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens"
    assert sorted(gateway.seen) == ["a", "b", "c"]
    # Done is done: another delivery of the task finds nothing to claim.
    assert await execute_batch(batch.id, Batches(db), files, CONFIG, gateway) == "not claimed"


async def test_outputs_are_bound_by_their_own_limit_not_the_upload_limit(
        db: Database, files: Files) -> None:
    batch = await new_batch(db, files, [request(str(i), "long") for i in range(8)])
    assert await execute_batch(batch.id, Batches(db), files, CONFIG, Gateway()) == "completed"
    done = await Batches(db).get("ten_a", batch.id)
    assert done.output_file_id is not None
    assert (await files.get("ten_a", done.output_file_id)).bytes > 4096
    small = await new_batch(db, files, [request(str(i), "long") for i in range(8)])
    tight = CONFIG.model_copy(update={"max_output_bytes": 2048})
    assert await execute_batch(small.id, Batches(db), files, tight, Gateway()) == "failed"
    failed = await Batches(db).get("ten_a", small.id)
    assert failed.errors is not None and "2048" in failed.errors[0]["message"]
    assert failed.output_file_id is None


async def test_a_resumed_batch_sends_no_line_twice(db: Database, files: Files) -> None:
    batches = Batches(db)
    batch = await new_batch(db, files, [request(str(i), f"t{i}") for i in range(6)])
    # A first worker answered line 1 and had line 2 in flight when it died.
    assert await batches.claim(batch.id, "dead", 60) is not None
    first = await batches.start(batch.id, "dead", "0", 1, "r1")
    assert first is not None
    assert await batches.finish(batch.id, "dead", first, "r1", Answer(200, {"echo": "t0"}))
    assert await batches.start(batch.id, "dead", "1", 2, "r2") is not None
    assert await batches.start(batch.id, "dead", "0", 1, "again") is None  # never twice
    async with db.session() as session:  # its lease runs out
        await session.execute(update(Batch).values(lease_expires_at=utcnow()
                                                   - timedelta(seconds=1)))
        await session.commit()
    gateway = Gateway()
    assert await execute_batch(batch.id, batches, files, CONFIG, gateway) == "completed"
    assert sorted(gateway.seen) == ["2", "3", "4", "5"]
    done = await batches.get("ten_a", batch.id)
    assert (done.completed, done.failed) == (5, 1)
    output = await read(files, done.output_file_id)
    errors = await read(files, done.error_file_id)
    assert [o["custom_id"] for o in output] == ["0", "2", "3", "4", "5"]
    assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in errors] == [
        ("1", None, "batch_interrupted")]
    # The dead worker's late answer changes nothing.
    assert not await batches.finish(batch.id, "dead", first, "r1", Answer(200, {}))


async def test_cancel_stops_within_a_heartbeat_and_keeps_what_was_answered(
        db: Database, files: Files) -> None:
    batches = Batches(db)
    batch = await new_batch(db, files, [request(str(i), f"t{i}") for i in range(8)])
    gateway = Gateway(hold_from=3)  # lines 1-2 answer, the rest hang
    running = asyncio.create_task(execute_batch(batch.id, batches, files, CONFIG, gateway))

    async def answered() -> int:
        return (await batches.get("ten_a", batch.id)).completed

    async with asyncio.timeout(10):
        while await answered() < 2 or len(gateway.seen) < 4:
            await asyncio.sleep(0.02)
    cancelling, held = await batches.cancel("ten_a", batch.id)
    assert cancelling.status == "cancelling" and held
    async with asyncio.timeout(5):  # well within a few heartbeats, lines still hanging
        assert await running == "cancelled"
    done = await batches.get("ten_a", batch.id)
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at
    assert [o["custom_id"] for o in await read(files, done.output_file_id)] == ["0", "1"]
    errors = await read(files, done.error_file_id)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}  # those in flight
    assert len(errors) == done.failed == 2
    assert len(gateway.seen) == 4  # nothing was sent after the cancel


async def test_a_cancel_before_any_worker_took_it_is_finished_by_one(
        db: Database, files: Files) -> None:
    batches = Batches(db)
    batch = await new_batch(db, files, [request("a", "x")])
    _, held = await batches.cancel("ten_a", batch.id)
    assert not held  # the API queues it, for a worker to finish the cancel
    gateway = Gateway()
    assert await execute_batch(batch.id, batches, files, CONFIG, gateway) == "cancelled"
    done = await batches.get("ten_a", batch.id)
    assert gateway.seen == [] and done.output_file_id is None and done.error_file_id is None


async def test_an_expired_batch_lists_what_never_ran(db: Database, files: Files) -> None:
    batches = Batches(db)
    batch = await new_batch(db, files, [request("a", "x"), request("b", "y")],
                            window=timedelta(seconds=-1))
    gateway = Gateway()
    assert await execute_batch(batch.id, batches, files, CONFIG, gateway) == "expired"
    done = await batches.get("ten_a", batch.id)
    assert done.status == "expired" and done.expired_at is not None and gateway.seen == []
    errors = await read(files, done.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("a", "batch_expired"), ("b", "batch_expired")]


async def test_a_deleted_input_file_fails_the_batch(db: Database, files: Files) -> None:
    batch = await new_batch(db, files, [request("a", "x")])
    await files.delete("ten_a", batch.input_file_id)
    assert await execute_batch(batch.id, Batches(db), files, CONFIG, Gateway()) == "failed"
    done = await Batches(db).get("ten_a", batch.id)
    assert done.errors is not None and done.errors[0]["code"] == "invalid_file"


async def test_orphans_and_a_deleted_tenants_batches(db: Database, files: Files) -> None:
    batches = Batches(db)
    batch = await new_batch(db, files, [request("a", "x")])
    assert await batches.orphaned() == []  # a minute's grace for its message
    assert await batches.orphaned(timedelta(0)) == [batch.id]
    assert await batches.claim(batch.id, "w", 60) is not None
    assert await batches.orphaned(timedelta(0)) == []  # held
    await batches.start(batch.id, "w", "a", 1, "r")
    assert await batches.forget_tenant("ten_a") == 1
    async with db.session() as session:
        assert list(await session.scalars(select(BatchRequest))) == []
    assert await batches.orphaned(timedelta(0)) == []


async def test_stopping_a_deleted_tenants_batches(db: Database, files: Files) -> None:
    batches = Batches(db)
    waiting = await new_batch(db, files, [request("a", "x")])
    held = await new_batch(db, files, [request("a", "x")])
    assert await batches.claim(held.id, "w", 60) is not None
    # What no worker holds is cancelled at once (no worker can take it); the rest is asked
    # to stop and named.
    assert await batches.stop_tenant("ten_a") == [held.id]
    assert (await batches.get("ten_a", waiting.id)).status == "cancelled"
    assert await batches.claim(waiting.id, "late", 60) is None
    assert not await batches.heartbeat(held.id, "w", 60)
    assert (await batches.get("ten_a", held.id)).status == "cancelling"
    assert await batches.enter(held.id, "w", "cancelled")
    assert await batches.stop_tenant("ten_a") == []
