"""DP-FedAvg's maths (McMahan et al. 2018; adaptive clipping after Andrew et al. 2021): pure.

Per round, with clip norm ``C`` and noise multiplier ``z``:

1. every agent clips its update (the change it made) to L2 norm ``C`` (the round config
   carries ``C``; the coordinator clips again, so a careless agent cannot break the bound);
2. the coordinator sums the clipped updates, each counted once whatever its example count
   (weighting by a count the agent reports would change the sensitivity), adds Gaussian
   noise of std ``z_update x C`` to the sum and divides by the number of updates ``m``;
3. the strategy (FedAvg or a server optimiser) takes that noisy mean as the round's one
   update.

Fixed clipping: ``z_update = z``. Adaptive clipping: each agent also says whether its update
was within ``C``; the coordinator adds N(0, sigma_b^2) to that count and moves ``C``
geometrically toward the ``target_quantile`` of the update norms:
``C <- C x exp(-eta x (noisy_fraction_within - target_quantile))``. The count costs privacy
too, so the update noise grows to ``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2`` and the pair is
worth exactly one Gaussian mechanism of multiplier ``z`` (Andrew et al., Theorem 1): the
accountant only ever sees ``z``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from protocol.errors import ConfigError
from protocol.updates import clip_update

__all__ = [
    "DP_OPTION_PREFIX",
    "MEAN_STRATEGIES",
    "DpOptions",
    "add_noise",
    "check_strategy",
    "next_clip_norm",
    "private_mean",
]

DP_OPTION_PREFIX = "dp_"
# Strategies that act on the mean update, so they can take the noisy mean instead.
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


@dataclass(frozen=True, slots=True)
class DpOptions:
    """DP-FedAvg settings of a plan; see the module docstring for what each one does."""

    noise_multiplier: float
    clip_norm: float
    delta: float = 1e-5
    target_epsilon: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None  # adaptive only; default: the multiplier

    def __post_init__(self) -> None:
        _positive("dp_noise_multiplier", self.noise_multiplier)
        _positive("dp_clip_norm", self.clip_norm)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.delta}", reason="bad_dp")
        if self.target_epsilon is not None:
            _positive("dp_target_epsilon", self.target_epsilon)
        if not 0.0 < self.target_quantile < 1.0:
            raise ConfigError("dp_target_quantile must be in (0, 1)", reason="bad_dp")
        _positive("dp_clip_learning_rate", self.clip_learning_rate)
        if self.adaptive and not 2.0 * self.count_stddev > self.noise_multiplier:
            raise ConfigError(
                f"adaptive clipping needs dp_clipped_count_stddev above half the noise "
                f"multiplier ({self.noise_multiplier / 2:g}): the count would use up the "
                "whole privacy budget",
                reason="bad_dp",
            )

    @property
    def count_stddev(self) -> float:
        """sigma_b, the std of the noise on the count of updates within the clip norm."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return self.noise_multiplier

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier of the noise on the update sum (above ``z`` when adaptive)."""
        if not self.adaptive:
            return self.noise_multiplier
        z, sigma_b = self.noise_multiplier, self.count_stddev
        return float((z**-2 - (2.0 * sigma_b) ** -2) ** -0.5)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DpOptions:
        return cls(**data)

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> DpOptions | None:
        """The ``dp_*`` options of a start command (``dp_noise_multiplier`` switches DP on)."""
        values = {
            key.removeprefix(DP_OPTION_PREFIX): value
            for key, value in options.items()
            if key.startswith(DP_OPTION_PREFIX)
        }
        if not values:
            return None
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            valid = ", ".join(DP_OPTION_PREFIX + name for name in sorted(known))
            raise ConfigError(
                f"unknown option(s) {', '.join(DP_OPTION_PREFIX + u for u in unknown)}; "
                f"valid: {valid}",
                reason="unknown_option",
            )
        for needed in ("noise_multiplier", "clip_norm"):
            if needed not in values:
                raise ConfigError(f"DP-FedAvg needs {DP_OPTION_PREFIX}{needed}", reason="bad_dp")
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            parsed[key] = _flag(key, value) if key == "adaptive" else _float(key, value)
        return cls(**parsed)


def add_noise(
    total: Sequence[np.ndarray], *, stddev: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """``total`` (float64 sums) plus independent N(0, stddev^2) on every coordinate."""
    return [np.asarray(t, np.float64) + rng.normal(0.0, stddev, size=np.shape(t)) for t in total]


def next_clip_norm(
    clip_norm: float, *, within: int, count: int, options: DpOptions, rng: np.random.Generator
) -> float:
    """The clip norm for the next round (adaptive clipping); ``within`` of ``count`` fit."""
    noisy_fraction = (within + rng.normal(0.0, options.count_stddev)) / max(count, 1)
    step = -options.clip_learning_rate * (noisy_fraction - options.target_quantile)
    return float(clip_norm * math.exp(step))


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}", reason="bad_dp")


def _float(key: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{DP_OPTION_PREFIX}{key} must be a number, got {value!r}", reason="bad_dp"
        ) from None


def _flag(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{DP_OPTION_PREFIX}{key} must be true or false", reason="bad_dp")


def private_mean(
    updates: Iterable[tuple[Sequence[np.ndarray], bool | None]],
    *,
    clip_norm: float,
    options: DpOptions,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], int, int]:
    """The noisy mean of clipped updates, how many there were and how many fit within C.

    ``updates`` yields (deltas, clipped by the agent); None when the agent did not say.
    """
    sums: list[np.ndarray] | None = None
    count = within = 0
    for deltas, agent_clipped in updates:
        clipped, norm = clip_update(deltas, clip_norm)
        if sums is None:
            sums = [np.zeros(np.shape(d), np.float64) for d in clipped]
        for running, delta in zip(sums, clipped, strict=True):
            np.add(running, delta, out=running)
        count += 1
        within += int(not agent_clipped and norm <= clip_norm)
    if sums is None:
        raise ConfigError("no update to aggregate", reason="no_updates")
    noisy = add_noise(sums, stddev=options.update_noise_multiplier * clip_norm, rng=rng)
    return [total / count for total in noisy], count, within


def check_strategy(strategy: str, strategy_options: Mapping[str, object]) -> None:
    """Refuse, naming why, a strategy that cannot take DP-FedAvg's one noisy mean."""
    if strategy not in MEAN_STRATEGIES:
        raise ConfigError(
            f"DP-FedAvg adds its noise to the sum of the clipped updates, so the strategy "
            f"sees only their noisy mean; {strategy!r} needs every update on its own. "
            f"Use one of: {', '.join(MEAN_STRATEGIES)}",
            reason="dp_strategy",
        )
    if "clip_norm" in strategy_options:
        raise ConfigError(
            "the strategy option clip_norm and DP-FedAvg both clip: give dp_clip_norm only",
            reason="dp_strategy",
        )
