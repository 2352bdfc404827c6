"""Federated evaluation: agents' figures are checked, kept and aggregated by examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agent.evaluation import evaluate_model, held_out
from agent.head import HeadTrainer
from coordinator.federated_eval import federated_metrics, record_evaluation
from coordinator.state import CoordinatorState
from protocol.messages.evaluation import Evaluation
from protocol.messages.rounds import UpdateComplete, UpdateEncoding


def _evaluation(confusion: list[list[int]], accuracy: float, loss: float) -> Evaluation:
    counts = tuple(sum(row) for row in confusion)
    return Evaluation(
        model_version="r3",
        num_examples=sum(counts),
        loss=loss,
        accuracy=accuracy,
        class_counts=counts,
        confusion=tuple(tuple(row) for row in confusion),
    )


def _complete(agent: str, evaluation: Evaluation) -> UpdateComplete:
    return UpdateComplete(
        round=4,
        agent=agent,
        base_model_version="r3",
        update_sha256="0" * 64,
        update_size_bytes=1,
        chunk_count=1,
        chunk_bytes=1,
        encoding=UpdateEncoding.FLOAT32,
        num_examples=10,
        evaluation=evaluation,
    )


def test_an_inconsistent_evaluation_is_refused() -> None:
    with pytest.raises(ValidationError, match="add up to num_examples"):
        Evaluation(model_version="r1", num_examples=5, loss=0.1, accuracy=1.0, class_counts=(2,))
    with pytest.raises(ValidationError, match="confusion rows"):
        Evaluation(
            model_version="r1",
            num_examples=2,
            loss=0.1,
            accuracy=0.5,
            class_counts=(1, 1),
            confusion=((2, 0), (0, 0)),
        )


def test_agents_figures_are_weighted_by_examples(tmp_path: Path) -> None:
    state = CoordinatorState(tmp_path / "state.sqlite")
    record_evaluation(state, _complete("a", _evaluation([[3, 1], [0, 0]], 0.75, 0.4)))
    record_evaluation(state, _complete("b", _evaluation([[1, 0], [2, 8]], 0.818, 0.2)))
    metrics = federated_metrics(state, 4, ["a", "b", "c"])
    assert metrics["federated_examples"] == 15
    assert metrics["federated_agents"] == 2
    assert metrics["federated_accuracy"] == pytest.approx((0.75 * 4 + 0.818 * 11) / 15)
    assert metrics["federated_loss"] == pytest.approx((0.4 * 4 + 0.2 * 11) / 15)
    assert metrics["federated_class_counts"] == [5, 10]
    assert metrics["federated_confusion"] == [[4, 1], [2, 8]]
    assert federated_metrics(state, 5, ["a"]) == {}


def test_the_held_out_split_is_stable_and_a_model_is_measured_on_it() -> None:
    ids = [f"s{i}" for i in range(400)]
    mask = held_out(ids, 0.2)
    assert 0.12 < mask.mean() < 0.28
    # Adding samples never moves the old ones across the split.
    np.testing.assert_array_equal(held_out([*ids, "new"], 0.2)[:-1], mask)
    assert not held_out(ids, 0.0).any()
    head = HeadTrainer([np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    evaluation = evaluate_model(head, x, np.array([0, 1, 2, 0], np.int32), classes=3, version="r1")
    assert evaluation is not None
    assert evaluation.accuracy == 0.75
    assert evaluation.confusion == ((1, 0, 1), (0, 1, 0), (0, 0, 1))
    assert evaluate_model(head, x[:0], np.zeros(0, np.int32), classes=3, version="r1") is None
