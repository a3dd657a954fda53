"""The parts the reliability suite breaks on purpose: a private `redis-server` it can kill and
restart, a TCP forwarder in front of the shared PostgreSQL that it can cut and restore, a
FAKE vLLM upstream (see `fake_vllm`), and gateways and ingestion workers as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from llmops.cli import models_home
from llmops.cli.stack import Service, free_port, gateway_service
from tests.e2e.conftest import FAST_ROUTING, Running, start, wait_healthy
from tests.reliability.fake_vllm import CHAT  # served by the FAKE upstream, never by vLLM

__all__ = ["ADMIN_KEY", "CHAT", "EMBED", "GatewayProcess", "RedisServer", "TcpProxy",
           "fake_upstream", "gateway_config", "ingest_worker", "report", "start_gateway"]

ADMIN_KEY = "sk-reliability-admin-5f0c1d2e3a4b"
EMBED = "fake-embed"


class RedisServer:
    """A redis-server of our own on a free port, with an append-only file synced on every
    write, so that a kill and restart keeps what was acknowledged (as a production Redis
    holding the ledger stream must)."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed"
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.folder), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--protected-mode", "no"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             check=False).stdout.strip() != b"PONG":
            assert self.proc.poll() is None, (self.folder / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


class TcpProxy:
    """A loopback TCP forwarder in a thread of its own: `cut()` drops every connection and
    stops listening (the database is unreachable), `restore()` listens again."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.restore()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                 reuse_address=True)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def restore(self) -> None:
        self._run(self._listen())

    def cut(self) -> None:
        self._run(self._cut())

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def fake_upstream(logs: Path) -> Running:
    """The FAKE vLLM upstream as a process of its own."""
    port = free_port()
    running = start(Service("fake-vllm", [sys.executable, "-m", "tests.reliability.fake_vllm",
                                          str(port)], port, "/health"), logs)
    wait_healthy([running], timeout_s=30)
    return running


def gateway_config(folder: Path, upstream: str, *, redis_url: str, database_url: str | None
                   = None, **settings: Any) -> dict[str, Any]:
    """A gateway over the fake upstream, with the embedding model's real tokenizer (ingestion
    chunks by it), fast routing and ledger timings, and state under `folder`."""
    name = uuid.uuid4().hex[:8]
    weights = models_home() / "models" / "all-MiniLM-L6-v2"
    key_file = folder / "admin_key"
    key_file.write_text(ADMIN_KEY)
    key_file.chmod(0o600)
    return {
        "models": [
            {"name": CHAT, "kind": "chat", "context_length": 4096,
             "pools": [{"device": "cpu", "urls": [upstream]}]},
            {"name": EMBED, "kind": "embedding", "context_length": 256, "weights": str(weights),
             "pools": [{"device": "cpu", "urls": [upstream]}]},
        ],
        "admin_key_file": str(key_file),
        "database_url": database_url or f"sqlite:///{folder / f'store-{name}.db'}",
        "redis_url": redis_url,
        "redis_prefix": f"llmops-rel-{name}",
        "key_cache_ttl_s": 0.5,
        "files": {"root": str(folder / f"files-{name}"), "max_bytes": 1024 * 1024,
                  **settings.pop("files", {})},
        "ledger": {"spool_path": str(folder / f"spool-{name}"), "claim_idle_s": 1.0,
                   "block_ms": 200, **settings.pop("ledger", {})},
        # Fast probing, but lenient: 2 shared cores must not make the upstream look dead.
        "routing": {**FAST_ROUTING, "health_timeout_s": 5.0, "failure_threshold": 3},
        "retrieval": {"path": str(folder / f"qdrant-{name}")},
        "drift": {"enabled": False},
        **settings,
    }


@dataclass
class GatewayProcess:
    running: Running
    config: Path
    logs: Path
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.running.url

    def client(self, key: str = ADMIN_KEY, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {key}"})

    def stop(self) -> float:
        """SIGTERM, SIGKILL after 15 s; returns how long it took (0 when already stopped)."""
        if self.running.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.running.stop()
        return time.monotonic() - started

    def new_key(self, **fields: Any) -> dict[str, Any]:
        """A new tenant with one member key (or the role asked for)."""
        with self.client() as admin:
            tenant = admin.post("/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}"})
            assert tenant.status_code == 201, tenant.text
            key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"], **fields})
            assert key.status_code == 201, key.text
            return dict(key.json())


def start_gateway(folder: Path, logs: Path, settings: dict[str, Any],
                  env: dict[str, str] | None = None) -> GatewayProcess:
    port = free_port()
    config = folder / f"gateway-{port}.yaml"
    config.write_text(yaml.safe_dump(settings))
    service = gateway_service(port, config)
    running = start(Service(service.name, service.argv, port, "/readyz",
                            {**service.env, **(env or {})}), logs)
    wait_healthy([running], timeout_s=60)
    return GatewayProcess(running, config, logs, settings)


def ingest_worker(gateway: GatewayProcess, *, pool: str = "threads") -> Running:
    """A Celery worker on the `ingest` queue, sharing the gateway's config."""
    return start(Service("ingester", [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "ingest",
        "--pool", pool, "--concurrency", "1", "--loglevel", "info",
        "-n", f"rel-ingest-{uuid.uuid4().hex[:6]}@%h"], free_port(), None,
        {"LLMOPS_CONFIG": str(gateway.config),
         "LLMOPS_PORT": str(gateway.running.service.port)}), gateway.logs)


@contextlib.contextmanager
def stopping(*running: Running | GatewayProcess) -> Any:
    try:
        yield
    finally:
        for r in running:
            r.stop()


def report(scenario: str, **figures: Any) -> None:
    """Figures for docs/reliability.md: appended as JSON lines to the file named by
    LLMOPS_RELIABILITY_REPORT, when it is set."""
    path = os.environ.get("LLMOPS_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"scenario": scenario, **figures}) + "\n")
