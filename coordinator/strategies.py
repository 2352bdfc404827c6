"""Federated aggregation strategies: pure NumPy, streaming where the algorithm allows.

A strategy turns one round's updates into the next global weights::

    aggregation = strategy.begin(global_weights)
    for update in updates:              # any order, each agent at most once
        aggregation.add(update)
    next_global = aggregation.result()

Weights are lists of float arrays in the model's fixed order (Keras ``get_weights()``); an
update carries an agent's locally trained weights (not a delta) and its ``num_examples``.
Strategies do no I/O, read no clock and draw no random numbers. ``begin`` keeps references
to the global arrays, not copies: the caller must not change them until ``result()``.

Strategies::

    FedAvg            mean weighted by num_examples
    FedProx           FedAvg; its ``mu`` reaches the agents through the round config
    FedAdam, FedYogi  FedAvg's mean, then a server optimiser step on the pseudo-gradient
                      (mean - global), Algorithm 2 of Reddi et al., "Adaptive Federated
                      Optimization" (ICLR 2021)
    TrimmedMean       coordinate-wise mean after dropping the ``beta`` fraction at each end
    CoordinateMedian  coordinate-wise median
    NormClipping      wraps any of these; clips each update's delta to an L2 norm first

Memory: FedAvg, FedProx, FedAdam and FedYogi (clipped or not) keep one float64 running sum
per tensor and no update: O(model), whatever the number of agents. TrimmedMean and
CoordinateMedian need every update at once: they keep a reference to each update's arrays,
O(agents x model), plus one stacked tensor at a time while ``result()`` runs. Both ignore
``num_examples``: a count the agent reports itself would let one liar outweigh the rest.

State across rounds: only FedAdam and FedYogi have any (their optimiser moments and step
count). It advances when ``result()`` runs, once per aggregation. The caller persists
``state_dict()`` next to the model version it produced and hands it to ``load_state_dict()``
after a restart; a resumed strategy then produces exactly what an uninterrupted one would.

Errors: an update that does not fit the global weights is a
:class:`~protocol.errors.ProtocolError` with the reasons of :mod:`coordinator.validation`,
or ``duplicate_update`` / ``bad_num_examples``. ``result()`` with no update added is a
:class:`~protocol.errors.ConfigError` with reason ``no_updates``: a round only aggregates
after reaching its quorum, so an empty aggregation means a quorum of zero was configured.
Bad strategy names, options and state are ``ConfigError`` too.
"""

from __future__ import annotations

import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from coordinator.validation import update_norm, validate_update
from protocol.errors import ConfigError, ProtocolError

__all__ = [
    "Aggregation",
    "ClientUpdate",
    "ConfigValue",
    "CoordinateMedian",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "NormClipping",
    "Strategy",
    "StrategyState",
    "TrimmedMean",
    "make_strategy",
    "strategy_names",
]

_log = logging.getLogger(__name__)

ConfigValue = float | int | str | bool
StrategyState = dict[str, list[np.ndarray] | float | int]
_F64 = npt.NDArray[np.float64]
_F32 = npt.NDArray[np.float32]
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# The same bound the round config puts on proximal_mu.
MAX_PROXIMAL_MU = 100.0
_CLIP_OPTION = "clip_norm"


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """One agent's locally trained weights for a round.

    ``eq=False``: comparing arrays field by field has no single truth value.
    """

    agent: str
    weights: Sequence[np.ndarray]
    num_examples: int

    def __post_init__(self) -> None:
        count = self.num_examples
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise ProtocolError(
                f"update from {self.agent!r} claims num_examples={count!r}; "
                "it must be a positive integer",
                reason="bad_num_examples",
            )


class Aggregation(ABC):
    """Collects one round's updates; ``result()`` gives the next global weights.

    Each update is checked against the global weights (count, shapes, float dtype, finite
    values) as it is added. ``result()`` finishes the aggregation: later calls return the
    same weights again, and ``add`` afterwards is refused.
    """

    def __init__(self, global_weights: Sequence[np.ndarray]) -> None:
        self._reference: tuple[np.ndarray, ...] = tuple(global_weights)
        self._agents: set[str] = set()
        self._result: list[np.ndarray] | None = None

    @property
    def count(self) -> int:
        """How many updates were added."""
        return len(self._agents)

    def add(self, update: ClientUpdate) -> None:
        if self._result is not None:
            raise ConfigError(
                "this aggregation already produced its result; begin a new one",
                reason="aggregation_finished",
            )
        if update.agent in self._agents:
            raise ProtocolError(
                f"agent {update.agent!r} already contributed to this aggregation",
                reason="duplicate_update",
            )
        validate_update(
            update.weights, reference=self._reference, max_norm=None, max_relative_norm=None
        )
        self._add(update)
        self._agents.add(update.agent)

    def result(self) -> list[np.ndarray]:
        """The next global weights, each tensor in its global dtype (fresh copies)."""
        if self._result is None:
            if not self._agents:
                raise ConfigError("no update to aggregate", reason="no_updates")
            self._result = self._finish()
        return [tensor.copy() for tensor in self._result]

    @abstractmethod
    def _add(self, update: ClientUpdate) -> None: ...

    @abstractmethod
    def _finish(self) -> list[np.ndarray]: ...


class Strategy(ABC):
    """How a round's updates become the next global weights; see the module docstring."""

    name: ClassVar[str]

    @abstractmethod
    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        """Start aggregating one round's updates to ``global_weights``."""

    def round_config_overrides(self) -> dict[str, ConfigValue]:
        """Round config fields this strategy needs the agents to see."""
        return {}

    def state_dict(self) -> StrategyState:
        """What must survive a restart (copies); empty for stateless strategies."""
        return {}

    def load_state_dict(self, state: Mapping[str, list[np.ndarray] | float | int]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ConfigError(
                f"strategy {self.name!r} keeps no state, got keys {sorted(state)}",
                reason="bad_state",
            )


# --- aggregations ------------------------------------------------------------------------


class _WeightedMean(Aggregation):
    """Running float64 sum of ``num_examples * weights``: one array per tensor."""

    def __init__(
        self,
        global_weights: Sequence[np.ndarray],
        *,
        finish: Callable[[list[_F64]], list[np.ndarray]],
    ) -> None:
        super().__init__(global_weights)
        self._sums: list[_F64] = [
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


class _Stacked(Aggregation):
    """Keeps every update; reduces one stacked tensor (agents first) at a time."""

    def __init__(
        self,
        global_weights: Sequence[np.ndarray],
        *,
        reduce: Callable[[_F64], _F64],
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


class _Clipped(Aggregation):
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
            clipped = _shrink_delta(update.weights, self._reference, self._max_norm / norm)
            update = ClientUpdate(
                agent=update.agent, weights=clipped, num_examples=update.num_examples
            )
        self._inner.add(update)

    def _finish(self) -> list[np.ndarray]:
        return self._inner.result()


def _shrink_delta(
    weights: Sequence[np.ndarray], reference: Sequence[np.ndarray], scale: float
) -> list[np.ndarray]:
    """``reference + scale * (weights - reference)``, in the reference's dtypes."""
    shrunk: list[np.ndarray] = []
    for tensor, base in zip(weights, reference, strict=True):
        delta = np.subtract(tensor, base, dtype=np.float64)
        shrunk.append((base + scale * delta).astype(base.dtype))
    return shrunk


def _cast_like(reference: Sequence[np.ndarray], values: list[_F64]) -> list[np.ndarray]:
    return [value.astype(target.dtype) for value, target in zip(values, reference, strict=True)]


# --- strategies --------------------------------------------------------------------------


class FedAvg(Strategy):
    """Mean of the agents' weights, weighted by their ``num_examples`` (McMahan et al.)."""

    name: ClassVar[str] = "fedavg"

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        reference = tuple(global_weights)
        return _WeightedMean(reference, finish=lambda means: _cast_like(reference, means))


class FedProx(FedAvg):
    """FedAvg on the server; agents add ``mu/2 * ||w - w_global||^2`` to their loss."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, mu: float = 0.01) -> None:
        super().__init__()
        self.mu = _real("mu", mu, low=0.0, high=MAX_PROXIMAL_MU)

    def round_config_overrides(self) -> dict[str, ConfigValue]:
        return {"proximal_mu": self.mu}


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
        self.eta = _real("eta", eta, low=0.0, low_open=True)
        self.beta_1 = _real("beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = _real("beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.tau = _real("tau", tau, low=0.0, low_open=True)
        self._m: list[_F32] = []
        self._v: list[_F32] = []
        self._steps = 0

    @abstractmethod
    def _second_moment(self, v: _F64, delta_squared: _F64) -> _F64: ...

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        reference = tuple(global_weights)
        if self._m:
            _check_moment_shapes(self._m, reference, reason="state_mismatch")
        return _WeightedMean(reference, finish=lambda means: self._step(reference, means))

    def _step(self, reference: Sequence[np.ndarray], means: list[_F64]) -> list[np.ndarray]:
        if not self._m:
            self._m = [np.zeros(mean.shape, np.float32) for mean in means]
            self._v = [np.full(mean.shape, self.tau**2, np.float32) for mean in means]
        next_m: list[_F32] = []
        next_v: list[_F32] = []
        result: list[np.ndarray] = []
        for mean, current, m, v in zip(means, reference, self._m, self._v, strict=True):
            current64 = np.asarray(current, dtype=np.float64)
            delta = mean - current64
            m_new = self.beta_1 * m.astype(np.float64) + (1.0 - self.beta_1) * delta
            v_new = self._second_moment(v.astype(np.float64), delta * delta)
            stepped = current64 + self.eta * m_new / (np.sqrt(v_new) + self.tau)
            next_m.append(_saturated_float32(m_new))
            next_v.append(_saturated_float32(v_new))
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
        _check_moment_shapes(moments_m, moments_v, reason="bad_state")
        if not all(np.isfinite(t).all() for t in (*moments_m, *moments_v)):
            raise ConfigError(f"{self.name} state holds non-finite moments", reason="bad_state")
        if any((t < 0).any() for t in moments_v):
            raise ConfigError(f"{self.name} state holds a negative v", reason="bad_state")
        self._m, self._v, self._steps = moments_m, moments_v, steps


class FedAdam(_ServerOptimizer):
    """Adam on the server: ``v = beta_2 * v + (1 - beta_2) * delta**2``."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v: _F64, delta_squared: _F64) -> _F64:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_squared


class FedYogi(_ServerOptimizer):
    """Yogi on the server: ``v = v - (1 - beta_2) * delta**2 * sign(v - delta**2)``.

    v moves by an additive amount rather than a fraction of itself, so it forgets a large
    past gradient more slowly than Adam does.
    """

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: _F64, delta_squared: _F64) -> _F64:
        return v - (1.0 - self.beta_2) * delta_squared * np.sign(v - delta_squared)


class TrimmedMean(Strategy):
    """Coordinate-wise mean after dropping the ``beta`` fraction of values at each end.

    ``floor(beta * n)`` values go at each end (at least one value always remains); the mean
    is unweighted. Memory O(agents x model): see the module docstring.
    """

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = _real("beta", beta, low=0.0, high=0.5, high_open=True)

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        return _Stacked(global_weights, reduce=self._reduce)

    def _reduce(self, stacked: _F64) -> _F64:
        count = stacked.shape[0]
        # The small slack keeps e.g. 0.29 * 100 at 29, not 28.999... -> 28.
        cut = min(int(self.beta * count + 1e-9), (count - 1) // 2)
        ordered = np.sort(stacked, axis=0)
        return np.asarray(ordered[cut : count - cut].mean(axis=0), dtype=np.float64)


class CoordinateMedian(Strategy):
    """Coordinate-wise median (the mean of the two middle values for an even count)."""

    name: ClassVar[str] = "median"

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        return _Stacked(global_weights, reduce=_median)


def _median(stacked: _F64) -> _F64:
    return np.asarray(np.median(stacked, axis=0), dtype=np.float64)


class NormClipping(Strategy):
    """Clips each update's delta (weights - global) to L2 norm ``max_norm``, then ``inner``.

    Streams exactly when ``inner`` does; state and round config are ``inner``'s.
    """

    name: ClassVar[str] = "norm_clipping"

    def __init__(self, inner: Strategy, *, max_norm: float) -> None:
        super().__init__()
        self.inner = inner
        self.max_norm = _real("max_norm", max_norm, low=0.0, low_open=True)

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        reference = tuple(global_weights)
        return _Clipped(reference, inner=self.inner.begin(reference), max_norm=self.max_norm)

    def round_config_overrides(self) -> dict[str, ConfigValue]:
        return self.inner.round_config_overrides()

    def state_dict(self) -> StrategyState:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, list[np.ndarray] | float | int]) -> None:
        self.inner.load_state_dict(state)


# --- registry ----------------------------------------------------------------------------

_REGISTRY: Mapping[str, Callable[..., Strategy]] = {
    FedAvg.name: FedAvg,
    FedProx.name: FedProx,
    FedAdam.name: FedAdam,
    FedYogi.name: FedYogi,
    TrimmedMean.name: TrimmedMean,
    CoordinateMedian.name: CoordinateMedian,
}


def strategy_names() -> tuple[str, ...]:
    """The names :func:`make_strategy` knows."""
    return tuple(_REGISTRY)


def make_strategy(name: str, **options: ConfigValue) -> Strategy:
    """Build a strategy by name; ``clip_norm=<float>`` wraps it in :class:`NormClipping`.

    Option values may be numbers or strings holding numbers (as they arrive from a command
    line or a command message). Raises :class:`ConfigError` naming the valid names or
    options.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown strategy {name!r}; valid names: {', '.join(_REGISTRY)}",
            reason="unknown_strategy",
        )
    accepted = _option_names(factory)
    unknown = sorted(set(options) - accepted - {_CLIP_OPTION})
    if unknown:
        valid = ", ".join([*sorted(accepted), _CLIP_OPTION])
        raise ConfigError(
            f"strategy {name!r} takes no option(s) {', '.join(unknown)}; valid options: {valid}",
            reason="unknown_option",
        )
    values = {key: _number(key, value) for key, value in options.items()}
    clip_norm = values.pop(_CLIP_OPTION, None)
    strategy = factory(**values)
    if clip_norm is not None:
        strategy = NormClipping(strategy, max_norm=clip_norm)
    return strategy


def _option_names(factory: Callable[..., Strategy]) -> set[str]:
    parameters = inspect.signature(factory).parameters.values()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _number(name: str, value: object) -> float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError as exc:
            raise ConfigError(
                f"option {name} must be a number, not {value!r}", reason="bad_option"
            ) from exc
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"option {name} must be a number, not {value!r}", reason="bad_option")
    return float(value)


def _real(
    name: str,
    value: float,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float inside [low, high] (ends open when asked), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {value!r}", reason="bad_option")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must lie in {interval}, not {value!r}", reason="bad_option")
    return float(value)


def _saturated_float32(values: _F64) -> _F32:
    return np.clip(values, -_FLOAT32_MAX, _FLOAT32_MAX).astype(np.float32)


def _check_moment_shapes(
    moments: Sequence[np.ndarray], other: Sequence[np.ndarray], *, reason: str
) -> None:
    shapes = [np.shape(t) for t in moments]
    other_shapes = [np.shape(t) for t in other]
    if shapes != other_shapes:
        raise ConfigError(
            f"optimiser state shapes {shapes} do not match {other_shapes}", reason=reason
        )
