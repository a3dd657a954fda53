"""A real Prometheus (Debian's binary) for tests: started on a free port with a storage folder
of its own, scraping the given targets every second, stopped on exit."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from llmops.cli.stack import free_port, tail


@dataclass
class Prometheus:
    url: str
    log: Path

    def query(self, expr: str) -> httpx.Response:
        return httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)

    def result(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one element) of `expr` now."""
        resp = self.query(expr)
        assert resp.status_code == 200, f"{expr}: {resp.text}"
        data = resp.json()["data"]
        return list(data["result"]) if data["resultType"] in ("vector", "matrix") else [data]


@contextlib.contextmanager
def prometheus(folder: Path, jobs: Mapping[str, Sequence[str]] | None = None
               ) -> Iterator[Prometheus]:
    """Prometheus scraping `jobs` ({job: ["host:port", ...]}) every second."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}
                           for job, targets in (jobs or {}).items()],
    }))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{tail(log)}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"prometheus not ready:\n{tail(log)}"
            time.sleep(0.2)
        yield Prometheus(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
