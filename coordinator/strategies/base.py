"""What every strategy is: a :class:`Strategy` that begins an :class:`Aggregation` per round."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from coordinator.validation import validate_update
from protocol.errors import ConfigError, ProtocolError

__all__ = [
    "CLIP_OPTION",
    "F32",
    "F64",
    "Aggregation",
    "ClientUpdate",
    "ConfigValue",
    "Strategy",
    "StrategyState",
    "number_option",
    "real_option",
]

ConfigValue = float | int | str | bool
StrategyState = dict[str, list[np.ndarray] | float | int]
F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
CLIP_OPTION = "clip_norm"


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


def number_option(name: str, value: object) -> float:
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


def real_option(
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
