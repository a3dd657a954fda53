"""The Celery workers' metrics: families and labels, training gauges that live only while a job
trains, tasks counted through Celery's own signals, and `/metrics` served over HTTP behind the
metrics token from a worker's start to its shutdown."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from celery import Celery, signals
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from llmops.cli.stack import free_port
from llmops.settings import Settings
from observability.worker_metrics import (
    INGEST_QUEUE,
    METRICS,
    TRAINING_QUEUE,
    WorkerMetrics,
    WorkerMetricsServer,
)
from workers.app import FINETUNE_QUEUE, FINETUNE_TASK, INGEST_TASK
from workers.app import INGEST_QUEUE as INGEST_TASK_QUEUE
from workers.metrics import instrument_worker, task_outcome

TOKEN = "scrape-me"


def parse(text: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """{family: {(sample name, sorted labels): value}}."""
    return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_families_follow_prometheus_conventions() -> None:
    m = WorkerMetrics()
    with m.training("smol"):
        m.training_step("smol", 1, 4, 2.5, 100, 400.0)
        m.embedded(64, 0.2)
        m.upserted(64)
        m.file_ingested("completed", 1.5)
        m.task_started("ingest")
        m.task_ended("ingest", "completed", 2.0)
        status, body, content_type = m.scrape(None, None)
        assert sample(m, "llmops_finetune_progress_ratio", base_model="smol") == 0.25
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    types = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    assert {
        "llmops_worker_tasks": "counter",
        "llmops_worker_task_duration_seconds": "histogram",
        "llmops_worker_tasks_in_progress": "gauge",
        "llmops_worker_progress_timestamp_seconds": "gauge",
        "llmops_finetune_train_loss": "gauge",
        "llmops_finetune_tokens_per_second": "gauge",
        "llmops_finetune_progress_ratio": "gauge",
        "llmops_finetune_steps": "counter",
        "llmops_finetune_tokens": "counter",
        "llmops_ingest_chunks_embedded": "counter",
        "llmops_ingest_chunks_upserted": "counter",
        "llmops_ingest_files": "counter",
        "llmops_ingest_file_duration_seconds": "histogram",
        "llmops_ingest_embedding_batch_seconds": "histogram",
    }.items() <= types.items()
    assert all(n.startswith(("llmops_", "process_")) and not n.endswith("_total")
               for n in types)
    # Bounded labels only: no job, file or store ids.
    labels = {k for family in parse(body.decode()).values() for _, ls in family for k, _ in ls}
    assert labels <= {"queue", "outcome", "base_model", "le"}
    assert sample(m, "llmops_finetune_tokens_total", base_model="smol") == 100
    assert sample(m, "llmops_ingest_chunks_upserted_total") == 64
    assert sample(m, "llmops_worker_task_duration_seconds_sum", queue="ingest",
                  outcome="completed") == 2.0


def test_idle_workers_export_zeros_not_absent_series() -> None:
    m = WorkerMetrics()
    for outcome in ("completed", "failed", "cancelled"):
        assert sample(m, "llmops_ingest_files_total", outcome=outcome) == 0
    for queue in (TRAINING_QUEUE, INGEST_QUEUE):
        assert sample(m, "llmops_worker_tasks_in_progress", queue=queue) == 0
    assert (TRAINING_QUEUE, INGEST_QUEUE) == (FINETUNE_QUEUE, INGEST_TASK_QUEUE)


def test_training_gauges_live_only_while_a_job_trains() -> None:
    m = WorkerMetrics()
    with m.training("smol"):
        # Counters start at 0, so that increase() sees the first step.
        assert sample(m, "llmops_finetune_steps_total", base_model="smol") == 0
        m.training_step("smol", 3, 6, 1.25, 50, 500.0)
        assert sample(m, "llmops_finetune_train_loss", base_model="smol") == 1.25
        assert sample(m, "llmops_finetune_tokens_per_second", base_model="smol") == 500
        progressed = sample(m, "llmops_worker_progress_timestamp_seconds", queue="finetune")
        assert progressed is not None and progressed > 1.7e9
    assert sample(m, "llmops_finetune_train_loss", base_model="smol") is None
    assert sample(m, "llmops_finetune_progress_ratio", base_model="smol") is None
    assert sample(m, "llmops_finetune_steps_total", base_model="smol") == 1
    with m.training("smol"):  # a job that fails before its first step
        pass


@pytest.fixture
def server() -> Iterator[WorkerMetricsServer]:
    m = WorkerMetrics()
    m.embedded(10, 0.05)
    running = WorkerMetricsServer(m, "127.0.0.1", free_port(), SecretStr(TOKEN))
    running.start()
    yield running
    running.stop()


def test_metrics_are_served_over_http_behind_the_token(server: WorkerMetricsServer) -> None:
    url = f"http://127.0.0.1:{server.port}/metrics"
    refused = httpx.get(url)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    resp = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200
    families = parse(resp.text)
    assert families["llmops_ingest_chunks_embedded"][
        ("llmops_ingest_chunks_embedded_total", ())] == 10


def test_a_taken_port_fails_the_start(server: WorkerMetricsServer) -> None:
    with pytest.raises(OSError):
        WorkerMetricsServer(WorkerMetrics(), "127.0.0.1", server.port, None).start()


def test_server_stops() -> None:
    port = free_port()
    running = WorkerMetricsServer(WorkerMetrics(), "127.0.0.1", port, None)
    running.start()
    running.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_task_outcome_is_a_bounded_label() -> None:
    assert task_outcome("SUCCESS", "not pending") == "not_pending"
    assert task_outcome("FAILURE", None) == "failure"
    assert task_outcome("SUCCESS", {"a": 1}) == "success"


def test_worker_counts_tasks_and_serves_from_start_to_shutdown() -> None:
    """Celery's own signals, as a worker sends them: tasks run eagerly in this process."""
    port = free_port()
    instrument_worker(Settings(metrics={"worker_port": port}))
    app = Celery("worker-metrics-test", set_as_current=False)
    app.conf.task_always_eager = True

    @app.task(name=INGEST_TASK)  # type: ignore[untyped-decorator]
    def ingest(outcome: str) -> str:
        return outcome

    @app.task(name=FINETUNE_TASK)  # type: ignore[untyped-decorator]
    def finetune() -> str:
        raise RuntimeError("boom")

    def count(queue: str, outcome: str) -> float:
        return sample(METRICS, "llmops_worker_tasks_total", queue=queue, outcome=outcome) or 0

    before = count("ingest", "completed"), count("finetune", "failure")
    signals.worker_init.send(sender=None)
    try:
        ingest.apply(args=["completed"])
        ingest.apply(args=["completed"])
        finetune.apply()
        resp = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert resp.status_code == 200 and "llmops_worker_tasks_total" in resp.text
    finally:
        signals.worker_shutdown.send(sender=None)
    assert (count("ingest", "completed"), count("finetune", "failure")) == (
        before[0] + 2, before[1] + 1)
    assert sample(METRICS, "llmops_worker_tasks_in_progress", queue="ingest") == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")
    instrument_worker(Settings())  # later workers in this process serve nothing
