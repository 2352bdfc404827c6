"""Federated evaluation on the agent: a deterministic held-out split and what it measures."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from agent.training import Trainer
from protocol.messages.evaluation import MAX_CONFUSION_CLASSES, Evaluation

__all__ = ["evaluate_model", "held_out"]

_HASH_SPACE = float(2**64)


def held_out(sample_ids: Sequence[str], fraction: float) -> np.ndarray:
    """Which samples are held out: by a hash of the id, so the same ones every round.

    A sample keeps its side of the split as long as it stays in the store, and new samples
    never move old ones: the held-out part is never trained on.
    """
    if fraction <= 0.0:
        return np.zeros(len(sample_ids), bool)
    points = [
        int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / _HASH_SPACE
        for i in sample_ids
    ]
    return np.asarray(points) < fraction


def evaluate_model(
    trainer: Trainer, x: np.ndarray, y: np.ndarray, *, classes: int, version: str
) -> Evaluation | None:
    """Loss, accuracy, per-class counts and confusion of ``trainer``'s model; None if no data."""
    if len(x) == 0:
        return None
    probabilities = np.asarray(trainer.predict(x), np.float64)
    loss, accuracy = trainer.evaluate(x, y)
    predicted = np.argmax(probabilities, axis=1)
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (y, predicted), 1)
    return Evaluation(
        model_version=version,
        num_examples=len(y),
        loss=max(0.0, float(loss)),
        accuracy=float(accuracy),
        class_counts=tuple(int(c) for c in confusion.sum(axis=1)),
        confusion=(
            tuple(tuple(int(v) for v in row) for row in confusion)
            if classes <= MAX_CONFUSION_CLASSES
            else ()
        ),
    )
