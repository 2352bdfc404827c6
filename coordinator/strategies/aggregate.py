"""The pure maths of aggregation: running weighted means, stacked reductions, clipping."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from coordinator.strategies.base import F32, F64, Aggregation, ClientUpdate
from coordinator.validation import update_norm

__all__ = [
    "FLOAT32_MAX",
    "Clipped",
    "Stacked",
    "WeightedMean",
    "cast_like",
    "coordinate_median",
    "saturated_float32",
    "shrink_delta",
]

_log = logging.getLogger(__name__)

FLOAT32_MAX = float(np.finfo(np.float32).max)


class WeightedMean(Aggregation):
    """Running float64 sum of ``num_examples * weights``: one array per tensor."""

    def __init__(
        self,
        global_weights: Sequence[np.ndarray],
        *,
        finish: Callable[[list[F64]], list[np.ndarray]],
    ) -> None:
        super().__init__(global_weights)
        self._sums: list[F64] = [
            np.zeros(np.shape(tensor), dtype=np.float64) for tensor in self._reference
        ]
        self._total_examples = 0
        self._finish_mean = finish

    def _add(self, update: ClientUpdate) -> None:
        count = int(update.num_examples)
        for running, tensor in zip(self._sums, update.weights, strict=True):
            np.add(running, np.multiply(tensor, count, dtype=np.float64), out=running)
        self._total_examples += count

    def _finish(self) -> list[np.ndarray]:
        means = [running / self._total_examples for running in self._sums]
        self._sums = []  # the result no longer needs them
        return self._finish_mean(means)


class Stacked(Aggregation):
    """Keeps every update; reduces one stacked tensor (agents first) at a time."""

    def __init__(
        self,
        global_weights: Sequence[np.ndarray],
        *,
        reduce: Callable[[F64], F64],
    ) -> None:
        super().__init__(global_weights)
        self._updates: list[Sequence[np.ndarray]] = []
        self._reduce = reduce

    def _add(self, update: ClientUpdate) -> None:
        self._updates.append(update.weights)

    def _finish(self) -> list[np.ndarray]:
        result: list[np.ndarray] = []
        for index, reference in enumerate(self._reference):
            stacked = np.stack([weights[index] for weights in self._updates], dtype=np.float64)
            result.append(self._reduce(stacked).astype(reference.dtype))
        return result


class Clipped(Aggregation):
    """Clips each update's delta, then hands it to the inner aggregation."""

    def __init__(
        self, global_weights: Sequence[np.ndarray], *, inner: Aggregation, max_norm: float
    ) -> None:
        super().__init__(global_weights)
        self._inner = inner
        self._max_norm = max_norm

    def _add(self, update: ClientUpdate) -> None:
        norm = update_norm(update.weights, self._reference)
        if norm > self._max_norm:
            _log.debug(
                "clipping the update of %s from delta norm %.6g to %.6g",
                update.agent,
                norm,
                self._max_norm,
            )
            clipped = shrink_delta(update.weights, self._reference, self._max_norm / norm)
            update = ClientUpdate(
                agent=update.agent, weights=clipped, num_examples=update.num_examples
            )
        self._inner.add(update)

    def _finish(self) -> list[np.ndarray]:
        return self._inner.result()


def shrink_delta(
    weights: Sequence[np.ndarray], reference: Sequence[np.ndarray], scale: float
) -> list[np.ndarray]:
    """``reference + scale * (weights - reference)``, in the reference's dtypes."""
    shrunk: list[np.ndarray] = []
    for tensor, base in zip(weights, reference, strict=True):
        delta = np.subtract(tensor, base, dtype=np.float64)
        shrunk.append((base + scale * delta).astype(base.dtype))
    return shrunk


def cast_like(reference: Sequence[np.ndarray], values: list[F64]) -> list[np.ndarray]:
    return [value.astype(target.dtype) for value, target in zip(values, reference, strict=True)]


def coordinate_median(stacked: F64) -> F64:
    return np.asarray(np.median(stacked, axis=0), dtype=np.float64)


def saturated_float32(values: F64) -> F32:
    return np.clip(values, -FLOAT32_MAX, FLOAT32_MAX).astype(np.float32)
