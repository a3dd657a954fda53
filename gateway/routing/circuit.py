"""A per-replica circuit breaker fed by passive failures (errors on real requests)."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Circuit", "CircuitState"]


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Circuit:
    """Opens after `threshold` consecutive failures and stays open for `cooldown_s`; then lets
    one trial request through (half-open), whose outcome closes or re-opens it."""

    threshold: int
    cooldown_s: float
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = field(default=False)

    @property
    def state(self) -> CircuitState:
        if self.opened_at is None:
            return CircuitState.CLOSED
        if self.clock() - self.opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def admits(self) -> bool:
        """Whether a new request may go to this replica now (no side effects)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        return state is CircuitState.HALF_OPEN and not self.trial_in_flight

    def on_dispatch(self) -> None:
        if self.state is CircuitState.HALF_OPEN:
            self.trial_in_flight = True

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.trial_in_flight = False

    def record_failure(self) -> None:
        self.failures += 1
        if self.trial_in_flight or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self.trial_in_flight = False

    def trip(self) -> None:
        """Open at once: the replica is known to be gone (connection refused)."""
        self.failures = max(self.failures, self.threshold)
        self.opened_at = self.clock()
        self.trial_in_flight = False
