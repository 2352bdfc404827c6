"""DP-FedAvg in the round logic: the privacy ledger, the budget stop, the noisy aggregation.

The ledger lives in the coordinator's SQLite state (key ``dp_ledger``): one entry per
aggregation that may have released a model, written before the release is published, never
removed. A crash between the entry and the release charges a round that released nothing;
that errs on the side of the agents. A new plan, a restart or a new budget does not reset
it: the data protected is the same agents' data.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from coordinator.accountant import ACCOUNTING, epsilon_spent
from coordinator.distributed_dp import DISTRIBUTED_ACCOUNTING, accounted_multiplier
from coordinator.dp import DpOptions, next_clip_norm, private_mean
from coordinator.state import CoordinatorState
from protocol.errors import ConfigError
from protocol.messages.rounds import PrivacySpent, RoundConfig, UpdateComplete
from protocol.updates import decode_update

__all__ = ["RoundPrivacy"]

logger = logging.getLogger(__name__)

LEDGER_KEY = "dp_ledger"
CLIP_KEY = "dp_clip_norm"
REFUSED_REASON = "privacy_budget"


class RoundPrivacy:
    """What a round runner asks about DP; every answer comes from (and goes to) the state."""

    def __init__(self, state: CoordinatorState) -> None:
        self._state = state

    def multipliers(self) -> list[float]:
        return [float(entry["noise_multiplier"]) for entry in self._state.get(LEDGER_KEY) or []]

    def spent(self, delta: float) -> float:
        return epsilon_spent(self.multipliers(), delta)

    def refusal(self, options: DpOptions, multiplier: float | None = None) -> str | None:
        """Why one more round would break the budget; None when it fits (or there is none).

        ``multiplier``: what the round will be charged as, when not ``options``' own.
        """
        if options.target_epsilon is None:
            return None
        charged = options.noise_multiplier if multiplier is None else multiplier
        after = epsilon_spent([*self.multipliers(), charged], options.delta)
        if after <= options.target_epsilon:
            return None
        return (
            f"privacy budget: one more round would spend epsilon {after:.4g} at delta "
            f"{options.delta:g}, above the budget of {options.target_epsilon:g} "
            f"({len(self.multipliers())} rounds charged, {self.spent(options.delta):.4g} spent)"
        )

    def charge(
        self,
        number: int,
        options: DpOptions,
        *,
        clip_norm: float,
        multiplier: float,
        accounting: str = ACCOUNTING,
    ) -> tuple[dict[str, Any], PrivacySpent]:
        """Write round ``number``'s Gaussian event (of ``multiplier``) to the ledger.

        Returns the round's DP metrics and the (epsilon, delta) spent with it.
        """
        ledger = [
            *(self._state.get(LEDGER_KEY) or []),
            {"round": number, "noise_multiplier": multiplier},
        ]
        self._state.put(LEDGER_KEY, ledger)
        epsilon = self.spent(options.delta)
        spent = PrivacySpent(
            epsilon=epsilon,
            delta=options.delta,
            rounds=len(ledger),
            noise_multiplier=multiplier,
            clip_norm=clip_norm,
            accounting=accounting,
            target_epsilon=options.target_epsilon,
        )
        metrics = {
            "dp_epsilon": epsilon,
            "dp_delta": options.delta,
            "dp_noise_multiplier": options.noise_multiplier,
            "dp_accounted_multiplier": multiplier,
            "dp_clip_norm": clip_norm,
        }
        return metrics, spent

    def charge_secure(
        self, number: int, options: DpOptions, config: RoundConfig, *, length: int
    ) -> tuple[dict[str, Any], PrivacySpent]:
        """:meth:`charge` for a secure round: its noise came from the agents, in steps."""
        params, clip_norm = config.secure_aggregation, config.clip_norm
        if params is None or clip_norm is None:
            raise ConfigError("a DP secure round without its parameters", reason="bad_dp")
        multiplier = accounted_multiplier(options, params, clip_norm=clip_norm, length=length)
        logger.info(
            "round %d: agents' noise std %.4g each (C=%.4g, z=%.3g, t=%d), charged as z=%.6g",
            number,
            params.dp_noise_stddev,
            clip_norm,
            options.noise_multiplier,
            params.threshold,
            multiplier,
        )
        return self.charge(
            number,
            options,
            clip_norm=clip_norm,
            multiplier=multiplier,
            accounting=DISTRIBUTED_ACCOUNTING,
        )

    def clip_norm(self, options: DpOptions) -> float:
        """This round's clip norm: the configured one, or where adaptive clipping moved it."""
        saved = self._state.get(CLIP_KEY)
        if options.adaptive and saved and saved.get("initial") == options.clip_norm:
            return float(saved["current"])
        return options.clip_norm

    def note(self, complete: UpdateComplete) -> None:
        """Remember whether an accepted update was clipped (adaptive clipping counts them)."""
        key = f"dp_clipped_r{complete.round}"
        noted = dict(self._state.get(key) or {})
        noted[complete.agent] = complete.clipped
        self._state.put(key, noted)

    def aggregate(
        self,
        number: int,
        base: Sequence[np.ndarray],
        updates: Iterable[tuple[str, bytes]],
        options: DpOptions,
    ) -> tuple[list[np.ndarray], dict[str, Any], PrivacySpent]:
        """The round's noisy mean update (as weights), its metrics, and the epsilon spent.

        ``updates`` yields (agent, encoded update), one at a time: memory stays O(model).
        """
        clip_norm = self.clip_norm(options)
        noted = self._state.get(f"dp_clipped_r{number}") or {}

        def deltas() -> Iterator[tuple[list[np.ndarray], bool | None]]:
            for agent, payload in updates:
                yield decode_update(payload), noted.get(agent)

        # Fresh OS entropy for every aggregation: noise anyone could replay protects nothing.
        rng = np.random.default_rng(secrets.randbits(128))
        mean, count, within = private_mean(deltas(), clip_norm=clip_norm, options=options, rng=rng)
        metrics, spent = self.charge(
            number, options, clip_norm=clip_norm, multiplier=options.noise_multiplier
        )
        if options.adaptive:
            following = next_clip_norm(
                clip_norm, within=within, count=count, options=options, rng=rng
            )
            self._state.put(CLIP_KEY, {"initial": options.clip_norm, "current": following})
        metrics["dp_within_clip"] = within
        logger.info(
            "round %d: DP mean of %d clipped updates (C=%.4g, z=%.3g); epsilon %.4g at delta %g",
            number,
            count,
            clip_norm,
            options.noise_multiplier,
            spent.epsilon,
            options.delta,
        )
        weights = [np.asarray(b, np.float64) + m for b, m in zip(base, mean, strict=True)]
        return (
            [w.astype(np.asarray(b).dtype) for w, b in zip(weights, base, strict=True)],
            metrics,
            spent,
        )
