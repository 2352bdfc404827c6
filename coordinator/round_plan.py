"""What a plan of rounds is, what a round ends with, and what makes the models.

Plain values and one interface, shared by the round runner and the daemon that drives it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.dp import DpOptions
from coordinator.pruning import PruningSchedule
from protocol.messages.rounds import (
    ModelMetrics,
    ModelRelease,
    RoundConfig,
)
from protocol.messages.secagg import SecAggParams

__all__ = [
    "ModelProducer",
    "OutcomeCallback",
    "ProgressCallback",
    "RoundOutcome",
    "RoundPlan",
    "_dumps",
]


class ModelProducer(ABC):
    """Turns weights into a published model; the TensorFlow one is in coordinator.production."""

    @abstractmethod
    def initial_weights(self) -> list[np.ndarray]: ...

    @abstractmethod
    def evaluate(self, weights: Sequence[np.ndarray]) -> ModelMetrics: ...

    @abstractmethod
    def release(
        self,
        *,
        version: str,
        round_number: int,
        weights: Sequence[np.ndarray],
        metrics: ModelMetrics | None,
    ) -> tuple[ModelRelease, dict[str, bytes]]:
        """The release and every blob it references, keyed by sha256."""


@dataclass(frozen=True, slots=True)
class RoundPlan:
    rounds: int = 1
    min_agents: int = 1
    fraction: float = 1.0
    deadline_s: float = 60.0
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    config: RoundConfig = field(default_factory=RoundConfig)
    max_update_norm: float | None = None
    privacy: DpOptions | None = None
    secure_aggregation: SecAggParams | None = None
    pruning: PruningSchedule | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "min_agents": self.min_agents,
            "fraction": self.fraction,
            "deadline_s": self.deadline_s,
            "strategy": self.strategy,
            "strategy_options": self.strategy_options,
            "config": self.config.model_dump(mode="json"),
            "max_update_norm": self.max_update_norm,
            "privacy": self.privacy.to_json() if self.privacy else None,
            "secure_aggregation": (
                self.secure_aggregation.model_dump(mode="json") if self.secure_aggregation else None
            ),
            "pruning": self.pruning.to_json() if self.pruning else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundPlan:
        return cls(
            rounds=data["rounds"],
            min_agents=data["min_agents"],
            fraction=data["fraction"],
            deadline_s=data["deadline_s"],
            strategy=data["strategy"],
            strategy_options=data["strategy_options"],
            config=RoundConfig.model_validate_json(_dumps(data["config"])),
            max_update_norm=data.get("max_update_norm"),
            privacy=DpOptions.from_json(data["privacy"]) if data.get("privacy") else None,
            secure_aggregation=(
                SecAggParams.model_validate_json(_dumps(data["secure_aggregation"]))
                if data.get("secure_aggregation")
                else None
            ),
            pruning=PruningSchedule.from_json(data["pruning"]) if data.get("pruning") else None,
        )


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    round: int
    ok: bool
    version: str | None
    reason: str | None
    metrics: dict[str, Any]
    privacy_stop: bool = False  # no round ran: the privacy budget could not pay for it
    stopped: bool = False  # ended by a stop request before quorum, not by a missing quorum


ProgressCallback = Callable[[dict[str, Any]], None]
OutcomeCallback = Callable[[RoundOutcome], None]


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value)
