"""Robust aggregation: trimmed mean, coordinate median, and norm clipping around any strategy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from coordinator.strategies.aggregate import Clipped, Stacked, coordinate_median
from coordinator.strategies.base import (
    F64,
    Aggregation,
    ConfigValue,
    Strategy,
    StrategyState,
    real_option,
)

__all__ = ["CoordinateMedian", "NormClipping", "TrimmedMean"]


class TrimmedMean(Strategy):
    """Coordinate-wise mean after dropping the ``beta`` fraction of values at each end.

    ``floor(beta * n)`` values go at each end (at least one value always remains); the mean
    is unweighted. Memory O(agents x model): see the module docstring.
    """

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = real_option("beta", beta, low=0.0, high=0.5, high_open=True)

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        return Stacked(global_weights, reduce=self._reduce)

    def _reduce(self, stacked: F64) -> F64:
        count = stacked.shape[0]
        # The small slack keeps e.g. 0.29 * 100 at 29, not 28.999... -> 28.
        cut = min(int(self.beta * count + 1e-9), (count - 1) // 2)
        ordered = np.sort(stacked, axis=0)
        return np.asarray(ordered[cut : count - cut].mean(axis=0), dtype=np.float64)


class CoordinateMedian(Strategy):
    """Coordinate-wise median (the mean of the two middle values for an even count)."""

    name: ClassVar[str] = "median"

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        return Stacked(global_weights, reduce=coordinate_median)


class NormClipping(Strategy):
    """Clips each update's delta (weights - global) to L2 norm ``max_norm``, then ``inner``.

    Streams exactly when ``inner`` does; state and round config are ``inner``'s.
    """

    name: ClassVar[str] = "norm_clipping"

    def __init__(self, inner: Strategy, *, max_norm: float) -> None:
        super().__init__()
        self.inner = inner
        self.max_norm = real_option("max_norm", max_norm, low=0.0, low_open=True)

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        reference = tuple(global_weights)
        return Clipped(reference, inner=self.inner.begin(reference), max_norm=self.max_norm)

    def round_config_overrides(self) -> dict[str, ConfigValue]:
        return self.inner.round_config_overrides()

    def state_dict(self) -> StrategyState:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, list[np.ndarray] | float | int]) -> None:
        self.inner.load_state_dict(state)
