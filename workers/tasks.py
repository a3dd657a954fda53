"""Celery entry points: `celery -A workers.tasks worker -Q finetune --pool solo` trains,
`celery -A workers.tasks worker -Q ingest` ingests files into vector stores,
`celery -A workers.tasks worker -Q eval` runs evals and background responses,
`celery -A workers.tasks worker -Q batch` runs batches."""

from __future__ import annotations

import asyncio

from celery import Task

from batches.run import run_batch
from conversations.background import run_background
from evals.runner import run_eval
from finetune.run import run_job
from llmops.settings import Settings
from observability.tracing import configure_tracing, task_span
from retrieval.ingestion import run_ingest
from workers.app import (
    BATCH_TASK,
    EVAL_TASK,
    FINETUNE_TASK,
    INGEST_TASK,
    RESPONSE_TASK,
    make_celery,
)
from workers.metrics import instrument_worker

settings = Settings()
app = make_celery(settings)
configure_tracing("llmops-worker")  # before the pool forks: the span processor survives forks
instrument_worker(settings)


@app.task(name=FINETUNE_TASK, bind=True)  # type: ignore[untyped-decorator]
def finetune(self: Task, job_id: str) -> str:
    """Run (or resume) one fine-tuning job; returns the job's final status."""
    with task_span(FINETUNE_TASK, self.request, {"llmops.job.id": job_id}):
        return asyncio.run(run_job(job_id, settings))


# Ingestion is idempotent, so a task whose worker died is simply delivered again.
@app.task(name=INGEST_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
def ingest(self: Task, store_id: str, file_id: str) -> str:
    """Ingest one file into one vector store; returns what became of it."""
    with task_span(INGEST_TASK, self.request,
                   {"llmops.vector_store.id": store_id, "llmops.file.id": file_id}):
        return asyncio.run(run_ingest(store_id, file_id, settings))


# Acked on receipt, like training: a run's lease in the database, not broker redelivery,
# brings back a run whose worker died (the gateway queues it again when its lease runs out).
@app.task(name=EVAL_TASK, bind=True)  # type: ignore[untyped-decorator]
def eval_run(self: Task, run_id: str) -> str:
    """Run (or resume) one eval run; returns what became of it."""
    with task_span(EVAL_TASK, self.request, {"llmops.eval_run.id": run_id}):
        return asyncio.run(run_eval(run_id, settings))


# Acked on receipt, like eval runs: the batch's lease in the database brings back a batch
# whose worker died, and its lines are never sent twice.
@app.task(name=BATCH_TASK, bind=True)  # type: ignore[untyped-decorator]
def batch(self: Task, batch_id: str) -> str:
    """Run (or resume, or finish cancelling) one batch; returns what became of it."""
    with task_span(BATCH_TASK, self.request, {"llmops.batch.id": batch_id}):
        return asyncio.run(run_batch(batch_id, settings))


# Acked on receipt: a response stays queued in the database if its worker dies before it
# starts, and one that started is marked failed when its stream ends early.
@app.task(name=RESPONSE_TASK, bind=True)  # type: ignore[untyped-decorator]
def background_response(self: Task, response_id: str) -> str:
    """Compute one background response; returns its final status."""
    with task_span(RESPONSE_TASK, self.request, {"llmops.response.id": response_id}):
        return asyncio.run(run_background(response_id, settings))
