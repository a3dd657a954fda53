"""Guardrail events: what a guardrail did to a request, and why, never with the data itself.

A request's events are tallied on its account as (stage, category, action, rule) with a count
of matches; when the request ends they go to the usage ledger, to the metrics (one event per
tally) and to the log (one line per tally, with the reason).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["GuardrailEvent", "Stage", "Tally", "log_events"]

log = logging.getLogger("guardrails")

Stage = Literal["input", "output", "retrieval"]


@dataclass
class GuardrailEvent:
    stage: Stage
    category: str  # a sensitive data category, or prompt_size, message_count, deny_pattern,
    # prompt_injection: a small fixed set, so a metric label
    action: str  # block | redact | log | drop
    count: int
    reason: str  # where and what, in words of our own: safe to log
    rule: str | None = None  # the deny pattern's or injection marker's name

    def record(self) -> dict[str, Any]:
        """The ledger's form."""
        out: dict[str, Any] = {"stage": self.stage, "category": self.category,
                               "action": self.action, "count": self.count}
        if self.rule is not None:
            out["rule"] = self.rule
        return out


class Tally:
    """A request's guardrail events, merged by (stage, category, action, rule)."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[GuardrailEvent] = []

    def add(self, stage: Stage, category: str, action: str, count: int, reason: str,
            rule: str | None = None) -> None:
        for event in self.events:
            if (event.stage, event.category, event.action, event.rule) == (stage, category,
                                                                           action, rule):
                event.count += count
                return
        self.events.append(GuardrailEvent(stage, category, action, count, reason, rule))

    def records(self) -> list[dict[str, Any]] | None:
        return [e.record() for e in self.events] or None

    def __bool__(self) -> bool:
        return bool(self.events)


def log_events(tally: Tally, request_id: str, tenant_id: str, key_id: str) -> None:
    """One line per event: the reason, never the value."""
    for e in tally.events:
        log.info("guardrail request=%s tenant=%s key=%s stage=%s category=%s action=%s "
                 "count=%d%s reason=%r", request_id, tenant_id, key_id, e.stage, e.category,
                 e.action, e.count, f" rule={e.rule}" if e.rule else "", e.reason)
