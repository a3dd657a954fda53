"""Priority classes: how urgent a request is. Interactive callers come first, then batches, then
background work (eval runs, background responses). A caller names its class in the
`x-llmops-priority` header; without it a request is interactive, the highest class, so a caller
can only ever lower its own. Our workers send their class when they call the gateway.

The class orders a tenant's own queued requests in the gateway and becomes vLLM's request
`priority` (lower is served earlier) on engines that run priority scheduling."""

from __future__ import annotations

import enum

__all__ = ["PRIORITY_HEADER", "Priority"]

PRIORITY_HEADER = "x-llmops-priority"


class Priority(enum.IntEnum):
    """Lower values are served first, as in vLLM's priority scheduling."""

    INTERACTIVE = 0
    BATCH = 1
    BACKGROUND = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | None) -> Priority:
        """The class a header names (None: interactive); ValueError for an unknown one."""
        if value is None:
            return cls.INTERACTIVE
        try:
            return cls[value.strip().upper()]
        except KeyError:
            names = ", ".join(p.label for p in cls)
            raise ValueError(f"{PRIORITY_HEADER} must be one of {names}") from None
