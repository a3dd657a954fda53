"""Experiment tracking on an MLflow tracking server, through its REST API (the `mlflow`
package's pins clash with ours, and a few calls are all a job needs).

A job's run is created before training (or reopened when the job resumes) with the job's
parameters; the trainer's per-step metrics are queued from the training thread and sent in
batches by a task on the job's event loop, so the training thread never waits on the server.
Every call has a bounded total time. The first failure stops tracking for the attempt and is
reported once, through `warn`: the job goes on, and its metrics remain in its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["MlflowClient", "RunRef", "Tracker", "TrackingError", "run_params",
           "start_tracking"]

log = logging.getLogger(__name__)
API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
MAX_METRICS, MAX_PARAMS = 1000, 100  # per log-batch request, as the server limits them
Warn = Callable[[str], Awaitable[None]]


class TrackingError(Exception):
    """The tracking server could not be reached in time, or refused a call."""


@dataclass(frozen=True)
class RunRef:
    """Where a job's run lives; stored on the job so a resumed job logs to the same run."""

    run_id: str
    experiment_id: str
    url: str
    artifact_uri: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRef:
        return cls(**{k: str(data[k]) for k in ("run_id", "experiment_id", "url",
                                                 "artifact_uri")})


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowClient:
    """The tracking server's REST API: experiments, runs, batched metrics and parameters, and
    artifact upload through its artifact proxy (`mlflow server` serves artifacts by default)."""

    def __init__(self, uri: str, timeout_s: float, artifact_timeout_s: float) -> None:
        self.uri = uri.rstrip("/")
        self.timeout_s = timeout_s
        self.artifact_timeout_s = artifact_timeout_s
        self.http = httpx.AsyncClient(base_url=self.uri, timeout=timeout_s)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, *, timeout_s: float | None = None,
                    **kwargs: Any) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):  # in all, not per read
                response = await self.http.request(method, path, **kwargs)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise TrackingError(f"{method} {path}: {type(exc).__name__} {exc}".strip()) from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise TrackingError(f"{method} {path}: HTTP {response.status_code} "
                                f"{body.get('error_code', '')} {body.get('message', '')}"[:500])
        return response.json() if response.content.strip() else {}

    async def experiment_id(self, name: str) -> str:
        """The experiment's id, creating it when it does not exist yet."""
        for _ in range(2):  # another job may create it between our two calls
            try:
                found = await self._call("GET", f"{API}/experiments/get-by-name",
                                         params={"experiment_name": name})
                return str(found["experiment"]["experiment_id"])
            except TrackingError as exc:
                if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                    raise
            try:
                made = await self._call("POST", f"{API}/experiments/create", json={"name": name})
                return str(made["experiment_id"])
            except TrackingError as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                    raise
        raise TrackingError(f"experiment {name!r} could neither be found nor created")

    async def create_run(self, experiment: str, run_name: str, tags: dict[str, str]) -> RunRef:
        experiment_id = await self.experiment_id(experiment)
        made = await self._call("POST", f"{API}/runs/create", json={
            "experiment_id": experiment_id, "run_name": run_name, "start_time": _now_ms(),
            "tags": [{"key": k, "value": v} for k, v in tags.items()]})
        info = made["run"]["info"]
        return RunRef(info["run_id"], experiment_id,
                      f"{self.uri}/#/experiments/{experiment_id}/runs/{info['run_id']}",
                      info["artifact_uri"])

    async def set_status(self, run_id: str, status: str) -> None:
        """RUNNING (again, on resume), FINISHED, FAILED or KILLED."""
        body: dict[str, Any] = {"run_id": run_id, "status": status}
        if status != "RUNNING":
            body["end_time"] = _now_ms()
        await self._call("POST", f"{API}/runs/update", json=body)

    async def log_batch(self, run_id: str, metrics: list[dict[str, Any]] | None = None,
                        params: dict[str, str] | None = None) -> None:
        metrics = metrics or []
        pairs = [{"key": k, "value": v} for k, v in (params or {}).items()]
        for i in range(0, len(pairs), MAX_PARAMS):
            await self._call("POST", f"{API}/runs/log-batch",
                             json={"run_id": run_id, "params": pairs[i: i + MAX_PARAMS]})
        for i in range(0, len(metrics), MAX_METRICS):
            await self._call("POST", f"{API}/runs/log-batch",
                             json={"run_id": run_id, "metrics": metrics[i: i + MAX_METRICS]})

    async def upload_dir(self, ref: RunRef, local: Path, artifact_path: str) -> int:
        """Upload every file under `local` to the run's `artifact_path`; returns bytes sent.
        Only runs whose artifacts the server proxies (`mlflow-artifacts:/...`) can take it."""
        if not ref.artifact_uri.startswith("mlflow-artifacts:"):
            raise TrackingError(f"the server does not proxy this run's artifacts "
                                f"({ref.artifact_uri}); start it with artifact serving on")
        root = ref.artifact_uri.removeprefix("mlflow-artifacts:").strip("/")
        files = sorted(p for p in local.rglob("*") if p.is_file())
        sent = 0
        async with asyncio.timeout(self.artifact_timeout_s):
            for path in files:
                rel = path.relative_to(local).as_posix()
                data = await asyncio.to_thread(path.read_bytes)
                await self._call("PUT", f"{ARTIFACTS}/{root}/{artifact_path}/{rel}",
                                 content=data, timeout_s=self.artifact_timeout_s)
                sent += len(data)
        return sent


class Tracker:
    """One attempt's logging to one run. `metrics` may be called from any thread and never
    blocks; the rest is awaited on the job's event loop."""

    def __init__(self, client: MlflowClient, ref: RunRef, warn: Warn, queue_size: int) -> None:
        self.client, self.ref, self.warn = client, ref, warn
        self.queue_size = queue_size
        self.loop = asyncio.get_running_loop()
        self.pending: list[dict[str, Any]] = []
        self.dropped = 0
        self.failed = False
        self._wake = asyncio.Event()
        self._closing = False
        self._sender = self.loop.create_task(self._send_loop())

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Queue one step's metrics (thread-safe, never waits)."""
        now = _now_ms()
        rows = [{"key": k, "value": float(v), "timestamp": now, "step": step}
                for k, v in values.items()]
        self.loop.call_soon_threadsafe(self._queue, rows)

    def _queue(self, rows: list[dict[str, Any]]) -> None:
        if self.failed or self._closing:
            return
        self.pending += rows
        overflow = len(self.pending) - self.queue_size
        if overflow > 0:  # the server is slower than training: keep the newest
            del self.pending[:overflow]
            self.dropped += overflow
        self._wake.set()

    def _finish_sending(self) -> None:
        self._closing = True
        self._wake.set()

    async def _send_loop(self) -> None:
        while not self.failed:
            await self._wake.wait()
            self._wake.clear()
            while self.pending and not self.failed:
                batch, self.pending = self.pending[:MAX_METRICS], self.pending[MAX_METRICS:]
                await self._guard(self.client.log_batch(self.ref.run_id, batch))
            if self._closing:
                return

    async def _guard(self, call: Awaitable[Any]) -> Any:
        """Run one call to the server; the first failure ends tracking with one warning."""
        if self.failed:
            if asyncio.iscoroutine(call):
                call.close()
            return None
        try:
            return await call
        except TrackingError as exc:
            await self._fail(exc)
            return None

    async def _fail(self, exc: Exception) -> None:
        self.failed = True
        log.warning("MLflow tracking of run %s stopped: %s", self.ref.run_id, exc)
        await self.warn(f"Experiment tracking stopped: {exc}. The job goes on; its metrics "
                        "remain in its events.")

    async def log(self, *, params: dict[str, str] | None = None,
                  metrics: dict[str, float] | None = None, step: int = 0) -> None:
        rows = [{"key": k, "value": float(v), "timestamp": _now_ms(), "step": step}
                for k, v in (metrics or {}).items()]
        await self._guard(self.client.log_batch(self.ref.run_id, rows, params))

    async def upload(self, local: Path, artifact_path: str) -> None:
        await self._guard(self.client.upload_dir(self.ref, local, artifact_path))

    async def close(self, status: str | None) -> None:
        """Send what is queued (within the call timeout), then end the run with `status`
        (None: leave it running, for the worker that took the job over)."""
        self.loop.call_soon(self._finish_sending)  # after any `_queue` already scheduled
        try:
            async with asyncio.timeout(self.client.timeout_s):
                await asyncio.shield(self._sender)
        except TimeoutError:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            if not self.failed:
                await self._fail(TrackingError("the last metrics could not be sent in time"))
        if self.dropped and not self.failed:
            await self.warn(f"Experiment tracking dropped {self.dropped} metric values the "
                            "server could not take in time; they remain in the job's events.")
        if status is not None:
            await self._guard(self.client.set_status(self.ref.run_id, status))
        await self.client.aclose()


async def start_tracking(uri: str, spec: dict[str, Any], previous: dict[str, Any] | None,
                         default_name: str, tags: dict[str, str], *, timeout_s: float,
                         artifact_timeout_s: float, queue_size: int, warn: Warn
                         ) -> Tracker | None:
    """Open the job's run: `previous` (a resumed job's run) or a new one in `spec`'s
    experiment. None, after a warning, when the server cannot be used."""
    client = MlflowClient(uri, timeout_s, artifact_timeout_s)
    try:
        if previous is not None:
            ref = RunRef.from_dict(previous)
            await client.set_status(ref.run_id, "RUNNING")
        else:
            ref = await client.create_run(spec["experiment"],
                                          spec.get("run_name") or default_name,
                                          {**tags, **(spec.get("tags") or {})})
    except TrackingError as exc:
        await client.aclose()
        log.warning("MLflow tracking unavailable: %s", exc)
        await warn(f"Experiment tracking is unavailable: {exc}. The job goes on without it; "
                   "its metrics are in its events.")
        return None
    return Tracker(client, ref, warn, queue_size)


def run_params(config: Any, extra: dict[str, Any]) -> dict[str, str]:
    """A training configuration (a dataclass) and extras as MLflow parameters (strings)."""
    values = {k: v for k, v in asdict(config).items() if k not in ("base_model", "output_dir")}
    values.update(extra)
    return {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))[:6000]
            for k, v in values.items() if v is not None}
