"""The coordinator's Prometheus metrics, fed by round progress and round outcomes."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coordinator.rounds import RoundOutcome

__all__ = ["ROUND_BUCKETS_S", "RoundMeter"]

ROUND_BUCKETS_S = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
OUTCOMES = ("done", "failed", "stopped")


class RoundMeter:
    """Counts what rounds report; the coordinator hands it progress and outcomes."""

    def __init__(self, registry: CollectorRegistry, *, current_round: int) -> None:
        self.rounds = Counter(
            "fedge_coordinator_rounds_total",
            "Rounds finished, by outcome.",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.rounds.labels(outcome)  # every outcome shows 0 before the first round
        self.round = Gauge(
            "fedge_coordinator_round", "The round running or last run.", registry=registry
        )
        self.round.set(current_round)
        self.updates = Counter(
            "fedge_coordinator_updates_total",
            "Agent updates accepted into rounds.",
            registry=registry,
        )
        self.bytes_up = Counter(
            "fedge_coordinator_update_bytes_total",
            "Bytes of agent updates received.",
            registry=registry,
        )
        self.accuracy = Gauge(
            "fedge_coordinator_accuracy",
            "Held-out accuracy of the newest round's model.",
            registry=registry,
        )
        self.federated_accuracy = Gauge(
            "fedge_coordinator_federated_accuracy",
            "Federated evaluation: agents' held-out accuracy of the model the newest round "
            "started from, weighted by examples.",
            registry=registry,
        )
        self.epsilon = Gauge(
            "fedge_coordinator_privacy_epsilon",
            "DP-FedAvg: epsilon spent so far (at the plan's delta), by the RDP accountant.",
            registry=registry,
        )
        self.seconds = Histogram(
            "fedge_coordinator_round_seconds",
            "Start to release, per round done.",
            buckets=ROUND_BUCKETS_S,
            registry=registry,
        )
        self._lock = threading.Lock()
        self._counted = (current_round, 0, 0)  # round, updates, bytes already counted

    def progress(self, progress: dict[str, Any]) -> None:
        # Progress reports running totals for the round; count only what is new.
        number, received, bytes_up = progress["round"], progress["received"], progress["bytes_up"]
        with self._lock:
            counted_round, counted_updates, counted_bytes = self._counted
            if number != counted_round:
                counted_updates = counted_bytes = 0
            self.updates.inc(max(0, received - counted_updates))
            self.bytes_up.inc(max(0, bytes_up - counted_bytes))
            self._counted = (number, received, bytes_up)
        self.round.set(number)

    def outcome(self, outcome: RoundOutcome) -> None:
        self.round.set(outcome.round)
        label = "done" if outcome.ok else "stopped" if outcome.stopped else "failed"
        self.rounds.labels(label).inc()
        if not outcome.ok:
            return
        if outcome.metrics.get("accuracy") is not None:
            self.accuracy.set(float(outcome.metrics["accuracy"]))
        if outcome.metrics.get("federated_accuracy") is not None:
            self.federated_accuracy.set(float(outcome.metrics["federated_accuracy"]))
        if outcome.metrics.get("dp_epsilon") is not None:
            self.epsilon.set(float(outcome.metrics["dp_epsilon"]))
        self.seconds.observe(float(outcome.metrics.get("seconds", 0.0)))
