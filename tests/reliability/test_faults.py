"""Fault injection on real processes (gateway, Redis, PostgreSQL, Celery worker) over the FAKE
vLLM upstream: Redis killed and restarted under load, the database path cut and restored
under load, an ingestion worker killed mid-file, and the files folder's disk full. Nothing
the gateway answered 200 for may be missing from the ledger, nothing may be counted twice,
limits must hold again afterwards, and a failed upload must leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy

from tests.e2e.conftest import Running
from tests.reliability.fake_vllm import COMPLETION_TOKENS, PROMPT_TOKENS
from tests.reliability.stack import (
    CHAT,
    EMBED,
    GatewayProcess,
    RedisServer,
    TcpProxy,
    gateway_config,
    ingest_worker,
    report,
    start_gateway,
)
from tests.reliability.test_fuzz import error_shape_problem


class Load:
    """Mixed traffic (chat, streamed chat, embeddings) from a few threads, each request with
    its own request id, until stopped: what was sent and what came back."""

    def __init__(self, gateway: GatewayProcess, key: str, threads: int = 3) -> None:
        self.gateway = gateway
        self.key = key
        self.results: dict[str, tuple[str, int]] = {}  # request id -> (kind, status)
        self.errors: list[str] = []  # answers not in OpenAI's shape, or no answer
        self.refusals: list[str] = []  # error answers in OpenAI's shape
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def _run(self, n: int) -> None:
        kinds = ("chat", "stream", "embedding")
        with httpx.Client(base_url=self.gateway.url, timeout=30,
                          headers={"Authorization": f"Bearer {self.key}"}) as client:
            i = n
            while not self.stop.is_set():
                kind = kinds[i % 3]
                i += 1
                rid = f"{kind}-{uuid.uuid4().hex[:12]}"
                headers = {"x-request-id": rid}
                try:
                    if kind == "embedding":
                        resp = client.post("/v1/embeddings", headers=headers,
                                           json={"model": EMBED, "input": "hello"})
                        status = resp.status_code
                    elif kind == "chat":
                        resp = client.post("/v1/chat/completions", headers=headers, json={
                            "model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
                        status = resp.status_code
                    else:
                        with client.stream("POST", "/v1/chat/completions", headers=headers,
                                           json={"model": CHAT, "stream": True, "messages": [
                                               {"role": "user", "content": "hi"}]}) as resp:
                            body = resp.read()
                        status = resp.status_code
                        if status == 200 and not body.rstrip().endswith(b"data: [DONE]"):
                            status = -1  # a stream cut short
                    if status >= 400 and error_shape_problem(resp.content) is not None:
                        self.errors.append(f"{rid}: {resp.status_code} {resp.text[:200]}")
                    elif status >= 400:
                        self.refusals.append(f"{kind} {resp.status_code} {resp.text[:200]}")
                except httpx.HTTPError as exc:
                    status = -2
                    self.errors.append(f"{rid}: {exc!r}")
                with self.lock:
                    self.results[rid] = (kind, status)


def ledger_rows(database_url: str, expected: set[str], tenants: set[str],
                timeout_s: float = 60) -> dict[str, Any]:
    """The usage rows of these tenants (the database may be shared with other tests) once
    every expected request id has a final (status != 0) record."""
    engine = sqlalchemy.create_engine(database_url.replace("postgresql://",
                                                          "postgresql+psycopg://"))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with engine.connect() as conn:
                rows = {r.request_id: r for r in conn.execute(
                    sqlalchemy.text("SELECT * FROM usage_records")) if r.tenant_id in tenants}
            final = {rid for rid, r in rows.items() if r.status != 0}
            if expected <= final or time.monotonic() > deadline:
                return rows
            time.sleep(0.25)
    finally:
        engine.dispose()


def assert_ledger_matches(load: Load, rows: dict[str, Any], also: frozenset[str] = frozenset()
                          ) -> None:
    """Every request answered 200 has exactly its one record with the upstream's usage, and
    the ledger holds nothing that was not sent."""
    served = {rid: kind for rid, (kind, status) in load.results.items() if status == 200}
    missing = set(served) - set(rows)
    assert not missing, f"{len(missing)} of {len(served)} served requests missing from ledger"
    assert set(rows) <= set(load.results) | also, "records for requests never sent"
    for rid, kind in served.items():
        row = rows[rid]
        completion = 0 if kind == "embedding" else COMPLETION_TOKENS
        prompt = 1 if kind == "embedding" else PROMPT_TOKENS
        assert (row.status, row.prompt_tokens, row.completion_tokens) == (
            200, prompt, completion), (rid, kind, row)


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def redis_server(rel_folder: Path) -> Iterator[RedisServer]:
    server = RedisServer(rel_folder / f"redis-{uuid.uuid4().hex[:6]}")
    server.start()
    yield server
    server.kill()


def test_redis_killed_and_restarted_under_load_loses_nothing_and_limits_recover(
        rel_folder: Path, upstream: Running, redis_server: RedisServer) -> None:
    settings = gateway_config(rel_folder, upstream.url, redis_url=redis_server.url)
    gateway = start_gateway(rel_folder, rel_folder, settings)
    try:
        busy_key = gateway.new_key()
        busy = busy_key["key"]
        limited = gateway.new_key(rpm_limit=3)["key"]
        with Load(gateway, busy) as load:
            wait_for(lambda: load.count() >= 30, 30, "no load before the fault")
            redis_server.kill()
            at_kill = load.count()
            time.sleep(3.0)
            during = load.count() - at_kill
            redis_server.start()
            at_restart = load.count()
            wait_for(lambda: load.count() >= at_restart + 30, 30, "no load after the restart")
        assert not load.errors, load.errors[:5]
        statuses = [s for _, s in load.results.values()]
        assert during > 0, "nothing was served while Redis was down"
        # Limits fail open (the default) while Redis is down: everything was served.
        assert set(statuses) == {200}, ({s: statuses.count(s) for s in set(statuses)},
                                        load.refusals[:5])
        rows = ledger_rows(settings["database_url"], set(load.results),
                           {busy_key["tenant_id"]})
        assert_ledger_matches(load, rows)
        spool = Path(settings["ledger"]["spool_path"])
        wait_for(lambda: not spool.exists() or spool.stat().st_size == 0, 30,
                 "the spool was not drained")
        # Limits hold again: three a minute, the fourth refused.
        with gateway.client(limited) as client:
            body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
            codes = [client.post("/v1/chat/completions", json=body).status_code
                     for _ in range(4)]
        assert codes == [200, 200, 200, 429], codes
        spooled = gateway.running.log.read_text().count("spooled to")
        assert spooled > 0, "Redis was down, yet no record went through the spool"
        report("redis killed and restarted under load", requests=len(statuses),
               served_while_down=during, outage_s=3.0, spooled_records=spooled,
               ledger_records=len(rows), lost=len(set(load.results) - set(rows)))
        assert gateway.stop() < 10.0, "the gateway did not shut down on SIGTERM"
    finally:
        gateway.stop()


@pytest.fixture
def db_proxy(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """The session's PostgreSQL database (on the shared server) reached through a forwarder
    that the test can cut: the gateway's database path fails, the server is never touched."""
    port = int(postgres_url.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = TcpProxy(port)
    yield proxy, postgres_url.replace(f":{port}/", f":{proxy.port}/")
    proxy.close()


def test_database_path_cut_and_restored_under_load_loses_nothing(
        rel_folder: Path, upstream: Running, db_proxy: tuple[TcpProxy, str]) -> None:
    proxy, database_url = db_proxy
    settings = gateway_config(rel_folder, upstream.url, redis_url="redis://127.0.0.1:6379/0",
                              database_url=database_url)
    gateway = start_gateway(rel_folder, rel_folder, settings)
    try:
        key_row, unseen_row = gateway.new_key(), gateway.new_key()
        key, unseen = key_row["key"], unseen_row["key"]
        chat = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
        with Load(gateway, key) as load:
            wait_for(lambda: load.count() >= 30, 30, "no load before the fault")
            proxy.cut()
            at_cut = load.count()
            time.sleep(1.0)
            with gateway.client(unseen) as client:  # a key never looked up cannot be checked
                refused = client.post("/v1/chat/completions", json=chat)
            assert refused.status_code == 503 and error_shape_problem(refused.content) is None
            assert refused.json()["error"]["code"] == "service_unavailable"
            time.sleep(3.0)
            during = load.count() - at_cut
            proxy.restore()
            at_restore = load.count()
            wait_for(lambda: load.count() >= at_restore + 60, 60, "no load after the restore")
        assert not load.errors, load.errors[:5]
        statuses = [s for _, s in load.results.values()]
        counts = {s: statuses.count(s) for s in set(statuses)}
        # A key looked up before the cut keeps working while the database is unreachable.
        assert set(counts) == {200}, (counts, load.refusals[:5])
        assert during > 0, "nothing was answered while the database was unreachable"
        after = list(load.results.values())[at_restore + 3:]
        assert {s for _, s in after} == {200}
        with gateway.client(unseen) as client:
            assert client.post("/v1/chat/completions", json=chat,
                               headers={"x-request-id": "unseen-after"}).status_code == 200
        rows = ledger_rows(database_url, {r for r, (_, s) in load.results.items() if s == 200},
                           {key_row["tenant_id"], unseen_row["tenant_id"]})
        assert_ledger_matches(load, rows, also=frozenset({"unseen-after"}))
        report("database path cut and restored under load", requests=len(statuses),
               answered_while_cut=during, outage_s=4.0, statuses=counts,
               ledger_records=len(rows),
               lost=len({r for r, (_, s) in load.results.items() if s == 200} - set(rows)))
        assert gateway.stop() < 10.0, "the gateway did not shut down on SIGTERM"
    finally:
        gateway.stop()


@pytest.mark.soak  # two worker start-ups and a redelivery: about 100 s, run by `make soak`
def test_worker_killed_mid_ingestion_and_file_completes_on_a_new_worker(
        rel_folder: Path, upstream: Running) -> None:
    settings = gateway_config(rel_folder, upstream.url, redis_url="redis://127.0.0.1:6379/0")
    # A dead worker's task is delivered again after this long (production: minutes).
    settings["retrieval"]["ingest_redelivery_s"] = 8.0
    gateway = start_gateway(rel_folder, rel_folder, settings)
    worker = ingest_worker(gateway, pool="prefork")
    fake = httpx.Client(base_url=upstream.url, timeout=10)
    try:
        fake.post("/_fake/config", json={"embed_delay_s": 60})
        delayed = fake.get("/_fake/stats").json().get("embeddings_delayed", 0)
        text = " ".join(f"Paragraph {i} about the warranty of kettle model {i}."
                        for i in range(200))
        with gateway.client() as client:
            file_id = client.post("/v1/files", files={"file": ("manual.txt", text.encode())},
                                  data={"purpose": "assistants"}).json()["id"]
            store = client.post("/v1/vector_stores", json={"name": "manuals",
                                                           "file_ids": [file_id]}).json()["id"]
            # The worker is inside the file: its embedding request hangs at the upstream.
            wait_for(lambda: fake.get("/_fake/stats").json().get("embeddings_delayed", 0)
                     > delayed, 90, "the worker never started embedding")
            child = psutil.Process(worker.proc.pid).children(recursive=True)
            assert child, "a prefork worker has a pool process"
            worker.kill()  # the whole worker, SIGKILL: a lost machine, not a shutdown
            status = client.get(f"/v1/vector_stores/{store}/files/{file_id}").json()["status"]
            assert status == "in_progress"
            fake.post("/_fake/config", json={"embed_delay_s": 0})
            worker = ingest_worker(gateway, pool="prefork")
            started = time.monotonic()

            def completed() -> bool:
                got = client.get(f"/v1/vector_stores/{store}/files/{file_id}").json()
                assert got["status"] in ("in_progress", "completed"), got
                return bool(got["status"] == "completed")

            wait_for(completed, 120, "the file never completed on the new worker")
            took = time.monotonic() - started
            hits = client.post(f"/v1/vector_stores/{store}/search",
                               json={"query": "kettle model 7 warranty"}).json()["data"]
            assert hits and hits[0]["file_id"] == file_id
            report("ingestion worker SIGKILLed mid-file", completed_on_new_worker=True,
                   seconds_to_complete=round(took, 1))
    finally:
        fake.post("/_fake/config", json={"embed_delay_s": 0})
        fake.close()
        worker.stop()
        gateway.stop()


@pytest.fixture
def small_disk(rel_folder: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of the test's own: a disk that really fills up."""
    mount = rel_folder / f"small-disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_gives_a_clear_error_and_leaves_nothing_half_written(
        rel_folder: Path, upstream: Running, small_disk: Path) -> None:
    root = small_disk / "files"
    settings = gateway_config(rel_folder, upstream.url, redis_url="redis://127.0.0.1:6379/0",
                              files={"root": str(root), "max_bytes": 8 * 1024 * 1024})
    gateway = start_gateway(rel_folder, rel_folder, settings)
    try:
        with gateway.client() as client:
            small = client.post("/v1/files", files={"file": ("a.txt", b"fits")},
                                data={"purpose": "assistants"})
            assert small.status_code == 200
            big = os.urandom(3 * 1024 * 1024)  # within the upload limit, beyond the disk
            resp = client.post("/v1/files", files={"file": ("big.bin", big)},
                               data={"purpose": "assistants"})
            assert resp.status_code == 507, (resp.status_code, resp.text)
            assert error_shape_problem(resp.content) is None
            assert resp.json()["error"]["code"] == "insufficient_storage"
            listed = [f["id"] for f in client.get("/v1/files").json()["data"]]
            assert listed == [small.json()["id"]]  # no row for the failed upload
            on_disk = sorted(p.name for p in root.rglob("*") if p.is_file())
            assert on_disk == [small.json()["id"]]  # and no partial file
            # Space freed (by the operator), uploads work again.
            again = client.post("/v1/files", files={"file": ("b.txt", b"x" * 1024)},
                                data={"purpose": "assistants"})
            assert again.status_code == 200
            assert client.get(f"/v1/files/{again.json()['id']}/content").content == b"x" * 1024
        report("files disk full", upload_bytes=len(big), disk_bytes=2 * 1024 * 1024,
               status=resp.status_code, rows_left=0, partial_files_left=0)
        assert gateway.stop() < 10.0, "the gateway did not shut down on SIGTERM"
    finally:
        gateway.stop()
