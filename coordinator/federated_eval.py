"""Federated evaluation on the coordinator: agents' held-out figures, weighted by examples.

Each update may carry an :class:`~protocol.messages.evaluation.Evaluation` of the model the
round started from. They are kept in the state beside the update (so a restarted
coordinator still has them) and summed when the round closes: accuracy and loss weighted by
each agent's examples, per-class counts and confusion matrices added up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from coordinator.state import CoordinatorState
from protocol.errors import FedgeError
from protocol.messages.evaluation import Evaluation
from protocol.messages.rounds import UpdateComplete

__all__ = ["federated_metrics", "record_evaluation"]


def _key(round_number: int, agent: str) -> str:
    return f"federated_eval:{round_number}:{agent}"


def record_evaluation(state: CoordinatorState, complete: UpdateComplete) -> None:
    if complete.evaluation is not None:
        state.put(_key(complete.round, complete.agent), complete.evaluation.model_dump_json())


def federated_metrics(
    state: CoordinatorState, round_number: int, agents: Iterable[str]
) -> dict[str, Any]:
    """The round's aggregated federated evaluation (empty when no agent reported one)."""
    evaluations = []
    for agent in agents:
        text = state.get(_key(round_number, agent))
        if text is None:
            continue
        try:
            evaluations.append(Evaluation.model_validate_json(text))
        except (ValueError, FedgeError):
            continue
    classes = {len(e.class_counts) for e in evaluations}
    if not evaluations or len(classes) != 1:
        return {}
    total = sum(e.num_examples for e in evaluations)
    counts = np.sum([e.class_counts for e in evaluations], axis=0)
    metrics: dict[str, Any] = {
        "federated_model": evaluations[0].model_version,
        "federated_agents": len(evaluations),
        "federated_examples": total,
        "federated_accuracy": sum(e.accuracy * e.num_examples for e in evaluations) / total,
        "federated_loss": sum(e.loss * e.num_examples for e in evaluations) / total,
        "federated_class_counts": [int(c) for c in counts],
    }
    if all(e.confusion for e in evaluations):
        confusion = np.sum([e.confusion for e in evaluations], axis=0)
        metrics["federated_confusion"] = confusion.astype(int).tolist()
    return metrics
