"""Celery entry points: `celery -A workers.tasks worker -Q finetune --pool solo` trains,
`celery -A workers.tasks worker -Q ingest` ingests files into vector stores."""

from __future__ import annotations

import asyncio

from llmops.settings import Settings
from workers.app import FINETUNE_TASK, INGEST_TASK, make_celery
from workers.finetune_job import run_job
from workers.ingest_job import run_ingest

settings = Settings()
app = make_celery(settings)


@app.task(name=FINETUNE_TASK)  # type: ignore[untyped-decorator]
def finetune(job_id: str) -> str:
    """Run (or resume) one fine-tuning job; returns the job's final status."""
    return asyncio.run(run_job(job_id, settings))


# Ingestion is idempotent, so a task whose worker died is simply delivered again.
@app.task(name=INGEST_TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
def ingest(store_id: str, file_id: str) -> str:
    """Ingest one file into one vector store; returns what became of it."""
    return asyncio.run(run_ingest(store_id, file_id, settings))
