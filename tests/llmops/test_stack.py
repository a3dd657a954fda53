"""The local stack's supervisor on real processes: idempotent start, clean stop, early exit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmops.cli.stack import (
    Service,
    StackLayout,
    batch_worker_service,
    eval_worker_service,
    free_port,
    ingest_worker_service,
    local_config,
    vllm_service,
    worker_service,
)
from llmops.settings import Settings


def http_server(port: int) -> Service:
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    return Service(f"web-{port}", argv, port, "/")


def test_start_is_idempotent_and_stop_is_clean(tmp_path: Path) -> None:
    layout = StackLayout(tmp_path)
    service = http_server(free_port())
    try:
        assert layout.start(service) is True
        layout.wait_healthy([service], timeout_s=30)
        pid = layout.running_pid(service)
        assert pid is not None
        assert layout.start(service) is False  # already running: left alone
        assert layout.running_pid(service) == pid
    finally:
        assert layout.stop(service.name) is True
    assert layout.running_pid(service) is None
    assert not service.healthy()
    assert layout.stop(service.name) is False


def test_a_service_that_dies_during_start_up_is_reported(tmp_path: Path) -> None:
    layout = StackLayout(tmp_path)
    broken = Service("broken", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                     free_port(), "/")
    layout.start(broken)
    with pytest.raises(RuntimeError, match="boom"):
        layout.wait_healthy([broken], timeout_s=30)


def test_admin_key_is_made_once_and_private(tmp_path: Path) -> None:
    layout = StackLayout(tmp_path / "state")
    key = layout.admin_key()
    assert key.startswith("sk-llmops-") and len(key) > 40
    assert layout.admin_key() == key
    assert layout.key_file.stat().st_mode & 0o077 == 0


def test_each_worker_gets_a_metrics_port_of_its_own(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    services = (worker_service(config, 8103), ingest_worker_service(config, 8104),
                eval_worker_service(config, 8105), batch_worker_service(config, 8106))
    assert [s.env["LLMOPS_METRICS__WORKER_PORT"] for s in services] == ["8103", "8104", "8105",
                                                                        "8106"]
    assert len({s.name for s in services}) == 4  # each has its own pid file and log
    assert all(s.env["LLMOPS_CONFIG"] == str(config) for s in services)
    assert "LLMOPS_METRICS__WORKER_PORT" not in worker_service(config).env  # off


def test_chat_engines_schedule_by_priority_and_the_gateway_knows_it(tmp_path: Path) -> None:
    """vLLM refuses a request priority on an engine started without priority scheduling: the
    local stack's config says which engines have it."""
    chat = vllm_service("chat", tmp_path, "chat", 1)
    embedding = vllm_service("embedding", tmp_path, "embedding", 2, embedding=True)
    assert chat.argv[chat.argv.index("--scheduling-policy") + 1] == "priority"
    assert "--scheduling-policy" not in embedding.argv
    config = Settings.model_validate(local_config(
        tmp_path, 8000, 1, 2, {"chat": tmp_path, "embedding": tmp_path}))
    assert {m.kind: m.pools[0].priority_scheduling for m in config.models} == {
        "chat": True, "embedding": False}
