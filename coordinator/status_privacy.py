"""The privacy spent so far, for the coordinator's status: read as rounds finish."""

from __future__ import annotations

from coordinator.state import CoordinatorState

__all__ = ["PrivacySpentReader"]


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
