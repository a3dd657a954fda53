"""The Celery app: Redis as the broker, one queue per kind of work so that GPU workers take
only training (`celery -A workers.tasks worker -Q finetune --pool solo`), CPU workers only
ingestion (`celery -A workers.tasks worker -Q ingest`), eval runs
(`celery -A workers.tasks worker -Q eval`) and batches
(`celery -A workers.tasks worker -Q batch`)."""

from __future__ import annotations

from celery import Celery

from llmops.settings import Settings

__all__ = ["BATCH_QUEUE", "BATCH_TASK", "EVAL_QUEUE", "EVAL_TASK", "FINETUNE_QUEUE",
           "FINETUNE_TASK", "INGEST_QUEUE", "INGEST_TASK", "RESPONSE_TASK", "make_celery"]

FINETUNE_QUEUE = "finetune"
FINETUNE_TASK = "llmops.finetune"
INGEST_QUEUE = "ingest"
INGEST_TASK = "llmops.ingest"
EVAL_QUEUE = "eval"
EVAL_TASK = "llmops.eval_run"
BATCH_QUEUE = "batch"
BATCH_TASK = "llmops.batch"
# Background responses call the gateway like eval runs do, on the same workers.
RESPONSE_TASK = "llmops.background_response"


def make_celery(settings: Settings) -> Celery:
    app = Celery("llmops", broker=settings.redis_url)
    app.conf.update(
        task_routes={FINETUNE_TASK: {"queue": FINETUNE_QUEUE},
                     INGEST_TASK: {"queue": INGEST_QUEUE},
                     EVAL_TASK: {"queue": EVAL_QUEUE},
                     BATCH_TASK: {"queue": BATCH_QUEUE},
                     RESPONSE_TASK: {"queue": EVAL_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        # One job per worker process, taken only when it is free: a long training run must
        # not hold short jobs behind it (celery#4537).
        worker_prefetch_multiplier=1,
        # Training acks on receipt: its crash safety comes from the job's lease in the
        # database, not from broker redelivery, which would start a long job twice
        # (celery#5935). Ingestion is idempotent and acks late instead (see workers.tasks).
        task_acks_late=False,
        broker_connection_timeout=5,
        # Celery's keys live under our prefix, like everything else we keep in Redis. A task
        # taken but not acknowledged (ingestion acks late) whose worker died goes back on the
        # queue after the visibility timeout: Redis's default of an hour stalls a file that long.
        broker_transport_options={"global_keyprefix": f"{settings.redis_prefix}:celery:",
                                  "visibility_timeout": settings.retrieval.ingest_redelivery_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app
