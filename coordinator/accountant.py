"""The epsilon accountant of DP-FedAvg: ``dp_accounting``'s RDP accountant, no amplification.

Every round that releases a model is one Gaussian mechanism on the sum of the agents'
clipped updates, with noise multiplier ``z`` (noise std over clip norm). The rounds compose;
:func:`epsilon_spent` turns the ledger of multipliers into the (epsilon, delta) guarantee for
one agent's whole sample store (user-level DP, add-or-remove-one-agent neighbouring).

Why no amplification by sampling: fedge selects ``max(min_agents, ceil(fraction x able))``
agents with a generator seeded by the round number, among the agents online at that moment.
That is neither Poisson sampling (the count is fixed) nor uniform sampling without
replacement from a fixed population (who is online, and who drops out, changes from round to
round and is not secret). The amplification theorems assume one of those, so the accountant
charges every round as if every agent took part. The figures are an upper bound: with real
sampling the true epsilon is lower.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant

from protocol.errors import ConfigError

__all__ = ["ACCOUNTING", "epsilon_spent"]

ACCOUNTING = "rdp, no sampling amplification"


def epsilon_spent(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon at ``delta`` after one Gaussian mechanism per entry of ``noise_multipliers``."""
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta}", reason="bad_delta")
    if not noise_multipliers:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant()
    # Equal multipliers compose as one self-composed event: the same numbers, less work.
    for multiplier, count in sorted(Counter(noise_multipliers).items()):
        if not multiplier > 0.0 or math.isinf(multiplier):
            raise ConfigError(
                f"noise multiplier must be positive and finite, got {multiplier}",
                reason="bad_noise_multiplier",
            )
        accountant.compose(dp_accounting.GaussianDpEvent(multiplier), count)
    return float(accountant.get_epsilon(delta))
