"""Server optimisers on FedAvg's pseudo-gradient: FedAdam and FedYogi (Reddi et al. 2021)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from coordinator.strategies.aggregate import WeightedMean, saturated_float32
from coordinator.strategies.base import (
    F32,
    F64,
    Aggregation,
    Strategy,
    StrategyState,
    real_option,
)
from protocol.errors import ConfigError

__all__ = ["FedAdam", "FedYogi"]


class _ServerOptimizer(Strategy, ABC):
    """FedAvg's mean, then an adaptive step on the pseudo-gradient, with moments m and v.

    Moments start at ``m = 0``, ``v = tau**2`` (Reddi et al. ask for ``v >= tau**2``), with
    no bias correction, as in the paper's Algorithm 2. Steps are computed in float64 and the
    moments kept in float32 (saturating at its range), like the weights: the tensor codec
    then stores the state losslessly, so a resumed strategy continues bit for bit.
    """

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__()
        self.eta = real_option("eta", eta, low=0.0, low_open=True)
        self.beta_1 = real_option("beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = real_option("beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.tau = real_option("tau", tau, low=0.0, low_open=True)
        self._m: list[F32] = []
        self._v: list[F32] = []
        self._steps = 0

    @abstractmethod
    def _second_moment(self, v: F64, delta_squared: F64) -> F64: ...

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        reference = tuple(global_weights)
        if self._m:
            check_moment_shapes(self._m, reference, reason="state_mismatch")
        return WeightedMean(reference, finish=lambda means: self._step(reference, means))

    def _step(self, reference: Sequence[np.ndarray], means: list[F64]) -> list[np.ndarray]:
        if not self._m:
            self._m = [np.zeros(mean.shape, np.float32) for mean in means]
            self._v = [np.full(mean.shape, self.tau**2, np.float32) for mean in means]
        next_m: list[F32] = []
        next_v: list[F32] = []
        result: list[np.ndarray] = []
        for mean, current, m, v in zip(means, reference, self._m, self._v, strict=True):
            current64 = np.asarray(current, dtype=np.float64)
            delta = mean - current64
            m_new = self.beta_1 * m.astype(np.float64) + (1.0 - self.beta_1) * delta
            v_new = self._second_moment(v.astype(np.float64), delta * delta)
            stepped = current64 + self.eta * m_new / (np.sqrt(v_new) + self.tau)
            next_m.append(saturated_float32(m_new))
            next_v.append(saturated_float32(v_new))
            result.append(stepped.astype(current.dtype))
        # Committed only once every tensor is done, so a failure leaves the state untouched.
        self._m, self._v = next_m, next_v
        self._steps += 1
        return result

    def state_dict(self) -> StrategyState:
        return {
            "m": [m.copy() for m in self._m],
            "v": [v.copy() for v in self._v],
            "steps": self._steps,
        }

    def load_state_dict(self, state: Mapping[str, list[np.ndarray] | float | int]) -> None:
        expected = {"m", "v", "steps"}
        if set(state) != expected:
            raise ConfigError(
                f"{self.name} state needs keys {sorted(expected)}, got {sorted(state)}",
                reason="bad_state",
            )
        m, v, steps = state["m"], state["v"], state["steps"]
        if not isinstance(m, list) or not isinstance(v, list):
            raise ConfigError(f"{self.name} state: m and v must be lists", reason="bad_state")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(
                f"{self.name} state: steps must be a non-negative int", reason="bad_state"
            )
        moments_m = [np.array(tensor, dtype=np.float32) for tensor in m]
        moments_v = [np.array(tensor, dtype=np.float32) for tensor in v]
        check_moment_shapes(moments_m, moments_v, reason="bad_state")
        if not all(np.isfinite(t).all() for t in (*moments_m, *moments_v)):
            raise ConfigError(f"{self.name} state holds non-finite moments", reason="bad_state")
        if any((t < 0).any() for t in moments_v):
            raise ConfigError(f"{self.name} state holds a negative v", reason="bad_state")
        self._m, self._v, self._steps = moments_m, moments_v, steps


class FedAdam(_ServerOptimizer):
    """Adam on the server: ``v = beta_2 * v + (1 - beta_2) * delta**2``."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v: F64, delta_squared: F64) -> F64:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_squared


class FedYogi(_ServerOptimizer):
    """Yogi on the server: ``v = v - (1 - beta_2) * delta**2 * sign(v - delta**2)``.

    v moves by an additive amount rather than a fraction of itself, so it forgets a large
    past gradient more slowly than Adam does.
    """

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: F64, delta_squared: F64) -> F64:
        return v - (1.0 - self.beta_2) * delta_squared * np.sign(v - delta_squared)


def check_moment_shapes(
    moments: Sequence[np.ndarray], other: Sequence[np.ndarray], *, reason: str
) -> None:
    shapes = [np.shape(t) for t in moments]
    other_shapes = [np.shape(t) for t in other]
    if shapes != other_shapes:
        raise ConfigError(
            f"optimiser state shapes {shapes} do not match {other_shapes}", reason=reason
        )
