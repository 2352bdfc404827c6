"""Per-task Prometheus metrics: each task's rounds, accuracy and federated accuracy."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from coordinator.round_plan import RoundOutcome
from coordinator.task_metrics import TaskMeter


def test_each_task_has_its_own_series() -> None:
    registry = CollectorRegistry()
    meter = TaskMeter(registry)
    done = RoundOutcome(3, ok=True, version="r3", reason=None, metrics={"accuracy": 0.8})
    meter.outcome("cnn", done)
    meter.outcome("mlp", RoundOutcome(1, ok=False, version=None, reason="quorum", metrics={}))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("fedge_coordinator_task_round", task="cnn") == 3
    assert value("fedge_coordinator_task_accuracy", task="cnn") == 0.8
    assert value("fedge_coordinator_task_rounds_total", task="cnn", outcome="done") == 1
    assert value("fedge_coordinator_task_rounds_total", task="mlp", outcome="failed") == 1
    assert value("fedge_coordinator_task_rounds_total", task="mlp", outcome="done") == 0
    assert value("fedge_coordinator_task_accuracy", task="mlp") is None
