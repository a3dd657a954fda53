"""Fixtures of the reliability suite: the FAKE vLLM upstream (one per session) and a gateway
process over it, on the shared Redis and a SQLite store of its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmops.cli import models_home
from tests.e2e.conftest import Running
from tests.reliability.stack import GatewayProcess, fake_upstream, gateway_config, start_gateway

SHARED_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def rel_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def upstream(rel_folder: Path) -> Iterator[Running]:
    running = fake_upstream(rel_folder)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def gateway(rel_folder: Path, upstream: Running) -> Iterator[GatewayProcess]:
    """A gateway whose chat model can be fine-tuned (its weights exist), so that every route
    has something real behind it."""
    settings = gateway_config(rel_folder, upstream.url, redis_url=SHARED_REDIS,
                              max_body_bytes=256 * 1024)
    settings["models"][0]["weights"] = str(models_home() / "models" / "SmolLM2-135M-Instruct")
    settings["drift"] = {"enabled": True}  # its admin routes answer 503 while it is off
    gw = start_gateway(rel_folder, rel_folder, settings)
    yield gw
    gw.stop()
