"""Prometheus metrics of the tasks a coordinator runs at once, labelled by task."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from coordinator.metrics import OUTCOMES
from coordinator.round_plan import RoundOutcome

__all__ = ["TaskMeter"]


class TaskMeter:
    """What each task's rounds report, as ``fedge_coordinator_task_*{task=...}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds = Counter(
            "fedge_coordinator_task_rounds_total",
            "Rounds of each of several tasks finished, by outcome.",
            ["task", "outcome"],
            registry=registry,
        )
        self.round = Gauge(
            "fedge_coordinator_task_round",
            "Each task's newest finished round.",
            ["task"],
            registry=registry,
        )
        self.accuracy = Gauge(
            "fedge_coordinator_task_accuracy",
            "Held-out accuracy of each task's newest model.",
            ["task"],
            registry=registry,
        )
        self.federated_accuracy = Gauge(
            "fedge_coordinator_task_federated_accuracy",
            "Each task's federated evaluation: its agents' held-out accuracy, by examples.",
            ["task"],
            registry=registry,
        )

    def outcome(self, task: str, outcome: RoundOutcome) -> None:
        for label in OUTCOMES:
            self.rounds.labels(task, label)  # every outcome shows, 0 until it happens
        self.round.labels(task).set(outcome.round)
        label = "done" if outcome.ok else "stopped" if outcome.stopped else "failed"
        self.rounds.labels(task, label).inc()
        if not outcome.ok:
            return
        for gauge, key in (
            (self.accuracy, "accuracy"),
            (self.federated_accuracy, "federated_accuracy"),
        ):
            if outcome.metrics.get(key) is not None:
                gauge.labels(task).set(float(outcome.metrics[key]))
