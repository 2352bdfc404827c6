"""Turning model outputs into results: top-k classes, or a compact summary of raw outputs.

Pure functions over NumPy arrays; nothing here knows about runtimes or MQTT.

Rules:

* A model is a classifier when it has exactly one output and that output's shape is
  (1, C) with C >= 2 (:func:`is_classifier`). Anything else (several heads, a detector,
  an embedding shaped (1, 1, D), a scalar) is reported with :func:`summarize_output`.
* :func:`classify` treats the scores as probabilities when every value lies in [0, 1] and
  they sum to 1 within :data:`PROBABILITY_SUM_TOLERANCE` (dequantised int8 softmax outputs
  are off by up to half a step per class); otherwise they are logits and get a softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from protocol.errors import ModelError

__all__ = [
    "FULL_VALUES_MAX",
    "HEAD_VALUES",
    "PROBABILITY_SUM_TOLERANCE",
    "OutputSummary",
    "Prediction",
    "classify",
    "is_classifier",
    "summarize_output",
]

PROBABILITY_SUM_TOLERANCE: Final = 0.05
# Outputs up to this many elements are reported in full; larger ones as stats plus a head.
FULL_VALUES_MAX: Final = 64
HEAD_VALUES: Final = 16
_RANGE_SLACK: Final = 1e-6


class _HasShape(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True, slots=True)
class Prediction:
    """One class of a classification result."""

    index: int
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class OutputSummary:
    """A raw output, small enough to publish.

    ``values`` holds every element (flattened, C order) when ``truncated`` is false, else
    the first :data:`HEAD_VALUES`. The statistics are None for an empty output.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    values: tuple[float, ...]
    truncated: bool
    min: float | None
    max: float | None
    mean: float | None
    std: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "values": list(self.values),
            "truncated": self.truncated,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
        }


def is_classifier(outputs_info: Sequence[_HasShape]) -> bool:
    """True for exactly one output shaped (1, C) with C >= 2."""
    if len(outputs_info) != 1:
        return False
    shape = tuple(outputs_info[0].shape)
    return len(shape) == 2 and shape[0] == 1 and shape[1] >= 2


def _looks_like_probabilities(scores: npt.NDArray[np.float64]) -> bool:
    in_range = bool(np.all(scores >= -_RANGE_SLACK) and np.all(scores <= 1.0 + _RANGE_SLACK))
    return in_range and abs(float(scores.sum()) - 1.0) <= PROBABILITY_SUM_TOLERANCE


def _softmax(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(z - z.max())
    probs: npt.NDArray[np.float64] = e / e.sum()
    return probs


def classify(
    scores: npt.ArrayLike,
    labels: Sequence[str] | None,
    *,
    top_k: int = 3,
    threshold: float = 0.0,
) -> list[Prediction]:
    """The ``top_k`` classes with probability >= ``threshold``, best first.

    ``scores`` is one sample: shape (C,) or (1, C). Ties keep the lower index first. A class
    without a label (no labels, or fewer labels than classes) is named by its index.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.size < 2:
        raise ModelError(
            f"classification needs one row of at least 2 scores, got shape {arr.shape}",
            reason="bad_output",
        )
    if not np.all(np.isfinite(arr)):
        raise ModelError("the model produced non-finite scores", reason="bad_output")
    probs = arr if _looks_like_probabilities(arr) else _softmax(arr)
    order = np.argsort(-probs, kind="stable")[:top_k]
    names = labels or ()
    return [
        Prediction(
            index=int(i),
            label=names[i] if i < len(names) else str(int(i)),
            score=float(probs[i]),
        )
        for i in order
        if probs[i] >= threshold
    ]


def summarize_output(array: npt.ArrayLike, *, name: str = "output") -> OutputSummary:
    """A compact description of one raw output (any shape, any numeric dtype)."""
    arr = np.asarray(array)
    flat = arr.reshape(-1).astype(np.float64)
    truncated = flat.size > FULL_VALUES_MAX
    shown = flat[:HEAD_VALUES] if truncated else flat
    empty = flat.size == 0
    return OutputSummary(
        name=name,
        shape=tuple(int(d) for d in arr.shape),
        dtype=arr.dtype.name,
        values=tuple(float(v) for v in shown),
        truncated=truncated,
        min=None if empty else float(flat.min()),
        max=None if empty else float(flat.max()),
        mean=None if empty else float(flat.mean()),
        std=None if empty else float(flat.std()),
    )
