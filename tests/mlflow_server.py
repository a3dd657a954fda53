"""A real MLflow tracking server for tests (the lead's venv: `make mlflow`), and reads of
what jobs logged to it, through its REST API."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

MLFLOW = Path(__file__).resolve().parents[1] / ".mlflow-venv" / "bin" / "mlflow"
API = "/api/2.0/mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on SQLite and a local artifact folder, proxying artifacts."""
    if not MLFLOW.exists():
        pytest.fail(f"No MLflow server at {MLFLOW}: run `make mlflow` first.")
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {(home / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not become healthy in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def get(url: str, endpoint: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{url}{endpoint}", params=params, timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def run(url: str, run_id: str) -> dict[str, Any]:
    found: dict[str, Any] = get(url, f"{API}/runs/get", run_id=run_id)["run"]
    return found


def history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    rows = get(url, f"{API}/metrics/get-history", run_id=run_id, metric_key=key)
    return sorted((int(m["step"]), float(m["value"])) for m in rows.get("metrics", []))


def artifacts(url: str, run_id: str, path: str) -> dict[str, int]:
    listed = get(url, f"{API}/artifacts/list", run_id=run_id, path=path)
    return {f["path"]: int(f.get("file_size", 0)) for f in listed.get("files", [])}
