"""Handing work to the Celery workers. A broker that cannot take a task answers 503, and the
caller undoes what it wrote: nothing is left queued that no worker will ever receive."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from llmops.errors import ServiceUnavailableError
from observability.tracing import task_headers

__all__ = ["enqueue"]

log = logging.getLogger(__name__)


async def enqueue(celery: Celery, task: str, args: list[Any]) -> None:
    """Send `task`; ServiceUnavailableError when the broker refused it or did not answer in
    time (`broker_connection_timeout`)."""
    try:
        await asyncio.to_thread(celery.send_task, task, args=args,
                                headers=task_headers())  # the task's span links to the request
    except OperationalError as exc:
        log.error("could not queue %s %s: %s", task, args, exc)
        raise ServiceUnavailableError("The job queue is unavailable; nothing was queued. "
                                      "Try again shortly.") from None
