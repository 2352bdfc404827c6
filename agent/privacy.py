"""The agent's side of differential privacy: clipping for DP-FedAvg, and local DP.

DP-FedAvg (central): the round config carries a clip norm ``C``; the agent scales its update
down to L2 norm ``C`` and says whether it had to (adaptive clipping counts those). The noise
is the coordinator's.

Local DP (an agent option, for a coordinator the agent does not trust): the agent clips to
its own ``local_dp_clip_norm`` (or the round's ``C``) and adds N(0, (z C)^2) to every
coordinate before anything leaves the device. Each round it takes part in is one Gaussian
mechanism on its own data; the agent keeps the count on disk and logs its epsilon (RDP, no
amplification: the agent cannot know how it was sampled). Local noise is large: it is not
averaged down by the other agents' until the coordinator sums them, so accuracy pays far more
than with central DP at the same epsilon.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.errors import ConfigError
from protocol.updates import clip_update

__all__ = ["LocalDp", "privatise_update"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LocalDp:
    noise_multiplier: float
    clip_norm: float | None = None  # None: the round's clip norm
    delta: float = 1e-5
    ledger_path: Path | None = None

    def rounds_spent(self) -> int:
        if self.ledger_path is None:
            return 0
        try:
            return int(json.loads(self.ledger_path.read_text())["rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def charge(self) -> float:
        """Count one more noised round on disk; the agent's epsilon after it."""
        rounds = self.rounds_spent() + 1
        if self.ledger_path is not None:
            temporary = self.ledger_path.with_suffix(".tmp")
            temporary.write_text(json.dumps({"rounds": rounds}))
            temporary.replace(self.ledger_path)
        # Imported here: dp_accounting pulls in scipy.stats and scipy.signal, about 0.5 s and
        # tens of MB at every agent's start-up, for agents that never use local DP.
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant

        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(self.noise_multiplier), rounds)
        return float(accountant.get_epsilon(self.delta))


def privatise_update(
    deltas: Sequence[np.ndarray],
    *,
    round_clip_norm: float | None,
    local: LocalDp | None,
    rng: np.random.Generator | None = None,
) -> tuple[list[np.ndarray], bool | None]:
    """The update as it may leave the agent, and whether clipping to the round's C bit.

    Returns ``clipped=None`` when the round asks for no clipping.
    """
    arrays = [np.asarray(d, np.float32) for d in deltas]
    clipped: bool | None = None
    if round_clip_norm is not None:
        arrays, norm = clip_update(arrays, round_clip_norm)
        clipped = norm > round_clip_norm
    if local is None:
        return arrays, clipped
    clip_norm = local.clip_norm if local.clip_norm is not None else round_clip_norm
    if clip_norm is None:
        raise ConfigError(
            "local DP needs a clip norm: set local_dp_clip_norm, or run rounds with dp_clip_norm",
            reason="local_dp_clip",
        )
    arrays, _ = clip_update(arrays, clip_norm)
    generator = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    stddev = local.noise_multiplier * clip_norm
    noised = [(a + generator.normal(0.0, stddev, size=a.shape)).astype(np.float32) for a in arrays]
    epsilon = local.charge()
    logger.info(
        "local DP: update noised (z=%.3g, C=%.4g); this agent's epsilon is now %.4g at delta %g",
        local.noise_multiplier,
        clip_norm,
        epsilon,
        local.delta,
    )
    return noised, clipped
