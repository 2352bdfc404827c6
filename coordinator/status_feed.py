"""What the coordinator's status needs cheaply: when to send it, and the privacy spent."""

from __future__ import annotations

import time
from typing import Any

from coordinator.state import CoordinatorState

__all__ = ["STATUS_MIN_INTERVAL_S", "PrivacySpentReader", "StatusPacer"]

STATUS_MIN_INTERVAL_S = 0.2


class StatusPacer:
    """Progress comes with every update and poll: the status goes out at most every
    ``STATUS_MIN_INTERVAL_S``, but at once for a new round or stage and for the last update
    (200 agents made 200 statuses a round)."""

    def __init__(self, min_interval_s: float = STATUS_MIN_INTERVAL_S) -> None:
        self._min_interval_s = min_interval_s
        self._previous: dict[str, Any] = {}
        self._sent_at = -min_interval_s

    def due(self, progress: dict[str, Any]) -> bool:
        previous, self._previous = self._previous, progress
        moved = any(progress.get(k) != previous.get(k) for k in ("round", "stage", "selected"))
        now = time.monotonic()
        due = moved or progress.get("received") == progress.get("selected")
        if due or now - self._sent_at >= self._min_interval_s:
            self._sent_at = now
            return True
        return False


class PrivacySpentReader:
    """The (epsilon, delta) of the newest DP round, for the status message.

    Reads only the rounds that finished since it last looked: the status goes out on every
    update received, and reading every round each time made rounds slower as they added up.
    """

    def __init__(self) -> None:
        self._scanned = 0  # every round up to this one has been looked at, and had finished
        self._spent: tuple[float, float] | None = None

    def spent(self, state: CoordinatorState) -> tuple[float, float] | None:
        for record in state.rounds(after=self._scanned):
            if record.state == "announced":
                break
            if "dp_epsilon" in record.metrics:
                self._spent = float(record.metrics["dp_epsilon"]), float(record.metrics["dp_delta"])
            self._scanned = record.round
        return self._spent
