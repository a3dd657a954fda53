"""The worker's metrics, wired into Celery: every task counted and timed by queue and outcome
(from Celery's task signals), and `/metrics` served while the worker runs, when
`metrics.worker_port` is set (see `observability.worker_metrics`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals

from llmops.settings import Settings
from observability.worker_metrics import METRICS, WorkerMetricsServer
from workers.app import (
    BATCH_QUEUE,
    BATCH_TASK,
    EVAL_QUEUE,
    EVAL_TASK,
    FINETUNE_QUEUE,
    FINETUNE_TASK,
    INGEST_QUEUE,
    INGEST_TASK,
)

__all__ = ["instrument_worker", "task_outcome"]

log = logging.getLogger(__name__)

_QUEUES = {FINETUNE_TASK: FINETUNE_QUEUE, INGEST_TASK: INGEST_QUEUE,
           EVAL_TASK: EVAL_QUEUE, BATCH_TASK: BATCH_QUEUE}
_started: dict[str, float] = {}  # task id -> start (monotonic); threads pool: one per thread


class _Serving:
    """What `worker_init` serves with (the latest `instrument_worker` call's settings)."""

    settings: Settings | None = None
    server: WorkerMetricsServer | None = None


def task_outcome(state: str | None, retval: Any) -> str:
    """A bounded label for how a task ended: what our tasks return ("completed", "not
    pending"...) when they return, else Celery's state ("failure", "retry"...)."""
    if state == "SUCCESS" and isinstance(retval, str):
        return retval.replace(" ", "_")
    return (state or "unknown").lower()


def _prerun(task_id: str, task: Any, **_: Any) -> None:
    _started[task_id] = time.monotonic()
    METRICS.task_started(_QUEUES.get(task.name, "other"))


def _postrun(task_id: str, task: Any, retval: Any = None, state: str | None = None,
             **_: Any) -> None:
    started = _started.pop(task_id, None)
    if started is not None:
        METRICS.task_ended(_QUEUES.get(task.name, "other"), task_outcome(state, retval),
                           time.monotonic() - started)


def _start(sender: Any = None, **_: Any) -> None:
    settings = _Serving.settings
    if settings is None or _Serving.server is not None:
        return
    port = settings.metrics.worker_port
    assert port is not None
    if "prefork" in str(getattr(sender, "pool_cls", "")).lower():
        log.warning("worker metrics see only this process: run workers with --pool solo or "
                    "--pool threads")
    server = WorkerMetricsServer(METRICS, settings.host, port, settings.metrics.token)
    server.start()  # Celery logs what it raises (a port taken) and the worker goes on
    _Serving.server = server
    log.info("worker metrics at http://%s:%d/metrics", settings.host, port)


def _stop(**_: Any) -> None:
    if _Serving.server is not None:
        _Serving.server.stop()
        _Serving.server = None


def instrument_worker(settings: Settings) -> None:
    """Count this process's tasks, and serve `/metrics` from worker start to shutdown when
    `metrics.worker_port` is set."""
    signals.task_prerun.connect(_prerun, weak=False, dispatch_uid="llmops-metrics-prerun")
    signals.task_postrun.connect(_postrun, weak=False, dispatch_uid="llmops-metrics-postrun")
    serve = settings.metrics.enabled and settings.metrics.worker_port is not None
    _Serving.settings = settings if serve else None
    signals.worker_init.connect(_start, weak=False, dispatch_uid="llmops-metrics-start")
    signals.worker_shutdown.connect(_stop, weak=False, dispatch_uid="llmops-metrics-stop")
