"""The status pacer: statuses for new rounds and the last update at once, others spaced."""

from __future__ import annotations

from coordinator.status_feed import StatusPacer


def test_progress_is_sent_when_it_matters_and_otherwise_spaced() -> None:
    pacer = StatusPacer(min_interval_s=3600.0)  # nothing is spaced out by the clock here
    assert pacer.due({"round": 1, "selected": 3, "received": 0})
    # The same round a moment later, one more update in: spaced out.
    assert not pacer.due({"round": 1, "selected": 3, "received": 1})
    # The last update of the round, and then a new round: at once.
    assert pacer.due({"round": 1, "selected": 3, "received": 3})
    assert pacer.due({"round": 2, "selected": 3, "received": 0})
    assert pacer.due({"round": 2, "selected": 3, "received": 0, "stage": "shares"})
