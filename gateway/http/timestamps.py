"""Times in API objects: epoch seconds, as OpenAI's objects carry them."""

from __future__ import annotations

from datetime import datetime
from typing import overload

from llmops.store import aware

__all__ = ["epoch"]


@overload
def epoch(value: datetime) -> int: ...
@overload
def epoch(value: None) -> None: ...
def epoch(value: datetime | None) -> int | None:
    """Epoch seconds of a stored time (None stays None). A naive time is UTC, as the store
    keeps every time; `datetime.timestamp` alone would read it as the machine's local time."""
    return None if value is None else int(aware(value).timestamp())
