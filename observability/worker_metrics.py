"""The Celery workers' own Prometheus metrics: training progress of fine-tuning jobs, ingestion
throughput, and tasks by queue and outcome, served at `GET /metrics` on `metrics.worker_port`.

One registry per process (`METRICS`), recorded by the task code and read by the server: the
pools we run workers with (solo for fine-tuning, threads for ingestion) execute every task in
the worker's only process, so what tasks record is what the server sees. A prefork pool would
record in child processes that no server reads.

Labels stay bounded: `base_model` is a catalog name, `queue` one of ours, `outcome` one of
the fixed results of our tasks; never a job, file or store id. Training gauges (loss, tokens
per second, progress) exist only while a job trains, so that a dashboard shows no stale line
between jobs; the counters are created at 0 when a run starts, so that `increase()` sees its
first step. `llmops_worker_progress_timestamp_seconds` moves whenever a task of the queue
starts, ends, trains a step or embeds a batch: the stall alerts compare it with the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from pydantic import SecretStr

from llmops.errors import error_body
from observability.metrics import CONTENT_TYPE
from observability.server import MetricsServer, authorized

__all__ = [
    "EMBED_BATCH_BUCKETS",
    "FILE_OUTCOMES",
    "INGEST_FILE_BUCKETS",
    "INGEST_QUEUE",
    "METRICS",
    "TASK_BUCKETS",
    "TRAINING_QUEUE",
    "WorkerMetrics",
    "WorkerMetricsServer",
]

# The queues whose progress training and ingestion report (workers.app names them).
TRAINING_QUEUE = "finetune"
INGEST_QUEUE = "ingest"
FILE_OUTCOMES = ("completed", "failed", "cancelled")
# From a quick ingestion task to a day-long training run.
TASK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
# A small text file takes well under a second, a book tens of minutes on a CPU engine.
INGEST_FILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                       300.0, 600.0, 1800.0)
EMBED_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                       60.0, 120.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.tasks = Counter("llmops_worker_tasks", "Celery tasks that ended, by queue and "
                             "outcome (what the task returned, or its Celery state).",
                             ["queue", "outcome"], registry=r)
        self.task_duration = Histogram(
            "llmops_worker_task_duration_seconds", "How long Celery tasks ran.",
            ["queue", "outcome"], buckets=TASK_BUCKETS, registry=r)
        self.tasks_in_progress = Gauge("llmops_worker_tasks_in_progress",
                                       "Celery tasks running now.", ["queue"], registry=r)
        self.progress = Gauge(
            "llmops_worker_progress_timestamp_seconds", "When a task of the queue last made "
            "progress: started, ended, trained a step or embedded a batch (Unix time).",
            ["queue"], registry=r)
        for queue in (TRAINING_QUEUE, INGEST_QUEUE):  # zeros from the start: idle, not absent
            self.tasks_in_progress.labels(queue)
        self.train_loss = Gauge("llmops_finetune_train_loss",
                                "Training loss of the latest step of the job training now.",
                                ["base_model"], registry=r)
        self.train_speed = Gauge("llmops_finetune_tokens_per_second",
                                 "Tokens per second of the latest training step.",
                                 ["base_model"], registry=r)
        self.train_progress = Gauge("llmops_finetune_progress_ratio",
                                    "Steps done over all steps of the job training now.",
                                    ["base_model"], registry=r)
        self.train_steps = Counter("llmops_finetune_steps", "Training steps done.",
                                   ["base_model"], registry=r)
        self.train_tokens = Counter("llmops_finetune_tokens",
                                    "Tokens trained on, padding excluded.", ["base_model"],
                                    registry=r)
        self.train_cost = Counter("llmops_finetune_cost_usd",
                                  "What training cost in US dollars, as billed to the ledger.",
                                  ["base_model"], registry=r)
        self.chunks_embedded = Counter("llmops_ingest_chunks_embedded",
                                       "Chunks embedded by the embedding model.", registry=r)
        self.chunks_upserted = Counter("llmops_ingest_chunks_upserted",
                                       "Chunks written to the vector index.", registry=r)
        self.files = Counter("llmops_ingest_files", "Files ingested, by outcome.", ["outcome"],
                             registry=r)
        for outcome in FILE_OUTCOMES:  # zeros, not absent series, before the first file
            self.files.labels(outcome)
        self.file_duration = Histogram(
            "llmops_ingest_file_duration_seconds",
            "Time to ingest one file: parse, chunk, embed and write.",
            buckets=INGEST_FILE_BUCKETS, registry=r)
        self.embed_batch = Histogram(
            "llmops_ingest_embedding_batch_seconds",
            "Latency of one embedding request for a batch of chunks.",
            buckets=EMBED_BATCH_BUCKETS, registry=r)
        ProcessCollector(registry=r)

    # Tasks (from Celery's signals).

    def task_started(self, queue: str) -> None:
        self.tasks_in_progress.labels(queue).inc()
        self.progress.labels(queue).set_to_current_time()

    def task_ended(self, queue: str, outcome: str, seconds: float) -> None:
        self.tasks_in_progress.labels(queue).dec()
        self.progress.labels(queue).set_to_current_time()
        self.tasks.labels(queue, outcome).inc()
        self.task_duration.labels(queue, outcome).observe(seconds)

    # Fine-tuning (steps are recorded from the training thread).

    @contextlib.contextmanager
    def training(self, base_model: str) -> Iterator[None]:
        """Around one training run of a job on `base_model`."""
        self.train_steps.labels(base_model)
        self.train_tokens.labels(base_model)
        self.train_cost.labels(base_model)
        try:
            yield
        finally:
            for gauge in (self.train_loss, self.train_speed, self.train_progress):
                with contextlib.suppress(KeyError):  # no step was recorded
                    gauge.remove(base_model)

    def training_step(self, base_model: str, step: int, total_steps: int, loss: float,
                      tokens: int, tokens_per_s: float) -> None:
        self.train_steps.labels(base_model).inc()
        self.train_tokens.labels(base_model).inc(tokens)
        self.train_loss.labels(base_model).set(loss)
        self.train_speed.labels(base_model).set(tokens_per_s)
        self.train_progress.labels(base_model).set(step / total_steps if total_steps else 0.0)
        self.progress.labels(TRAINING_QUEUE).set_to_current_time()

    # Ingestion.

    def embedded(self, chunks: int, seconds: float) -> None:
        self.chunks_embedded.inc(chunks)
        self.embed_batch.observe(seconds)
        self.progress.labels(INGEST_QUEUE).set_to_current_time()

    def upserted(self, chunks: int) -> None:
        self.chunks_upserted.inc(chunks)

    def file_ingested(self, outcome: str, seconds: float) -> None:
        self.files.labels(outcome).inc()
        self.file_duration.observe(seconds)

    # Scrapes.

    def scrape(self, token: SecretStr | None, authorization: str | None
               ) -> tuple[int, bytes, str]:
        """One scrape of `/metrics`: the text format, or 401 without the metrics token."""
        if not authorized(token, authorization):
            return 401, error_body("Scraping metrics needs the metrics token.",
                                   "invalid_request_error", code="invalid_api_key"), \
                "application/json"
        return 200, generate_latest(self.registry), CONTENT_TYPE


METRICS = WorkerMetrics()


class WorkerMetricsServer:
    """`MetricsServer` on an event loop in a daemon thread of its own: a Celery worker has no
    loop to lend (each task runs one with `asyncio.run` for its own life)."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int,
                 token: SecretStr | None) -> None:
        self.metrics, self.host, self.port, self.token = metrics, host, port, token
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="worker-metrics", daemon=True)

    def start(self) -> None:
        """Serve, once the port is bound; raises what binding raised (port taken...)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        server = MetricsServer(self.host, self.port,
                               lambda auth: self.metrics.scrape(self.token, auth))
        self._loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        try:
            await server.start()
        except Exception as exc:  # raised again by start(), in the worker's thread
            self._error = exc
        finally:
            self._ready.set()
        try:
            if self._error is None:
                await self._stopped.wait()
        finally:
            await server.stop()
