"""Celery workers: the app, its queues and task entry points (fine-tuning and ingestion)."""
