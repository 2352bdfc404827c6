"""FedAvg (McMahan et al.) and FedProx (its proximal term travels to the agents)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from coordinator.strategies.aggregate import WeightedMean, cast_like
from coordinator.strategies.base import Aggregation, ConfigValue, Strategy, real_option

__all__ = ["MAX_PROXIMAL_MU", "FedAvg", "FedProx"]

# The same bound the round config puts on proximal_mu.
MAX_PROXIMAL_MU = 100.0


class FedAvg(Strategy):
    """Mean of the agents' weights, weighted by their ``num_examples`` (McMahan et al.)."""

    name: ClassVar[str] = "fedavg"

    def begin(self, global_weights: Sequence[np.ndarray]) -> Aggregation:
        reference = tuple(global_weights)
        return WeightedMean(reference, finish=lambda means: cast_like(reference, means))


class FedProx(FedAvg):
    """FedAvg on the server; agents add ``mu/2 * ||w - w_global||^2`` to their loss."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, mu: float = 0.01) -> None:
        super().__init__()
        self.mu = real_option("mu", mu, low=0.0, high=MAX_PROXIMAL_MU)

    def round_config_overrides(self) -> dict[str, ConfigValue]:
        return {"proximal_mu": self.mu}
