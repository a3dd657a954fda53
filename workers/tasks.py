"""Celery entry points. `celery -A workers.tasks worker -Q finetune` runs them."""

from __future__ import annotations

import asyncio

from llmops.settings import Settings
from workers.app import FINETUNE_TASK, make_celery
from workers.finetune_job import run_job

settings = Settings()
app = make_celery(settings)


@app.task(name=FINETUNE_TASK)  # type: ignore[untyped-decorator]
def finetune(job_id: str) -> str:
    """Run (or resume) one fine-tuning job; returns the job's final status."""
    return asyncio.run(run_job(job_id, settings))
