"""DP-FedAvg with secure aggregation: distributed discrete Gaussian noise, and its accounting.

With secure aggregation the coordinator sees only the sum, so it cannot clip the updates or
add the noise itself, and noise it added could be taken out again by whoever runs it. Each
agent instead clips its update to ``C`` (the round config's clip norm), quantises it, and adds
discrete Gaussian noise of std ``sigma_agent = z C / sqrt(t)`` (in whole quantisation steps)
before masking. The coordinator unmasks a sum only when at least ``t`` (the Shamir threshold)
agents uploaded, and every agent refuses to help unmask fewer, so the released sum carries at
least ``t`` noise shares: std ``>= z C`` whoever dropped. With ``m`` survivors it carries
``sqrt(m / t) z C``, ``sqrt(m / t)`` times the noise central DP would add for the same
epsilon: that is the accuracy this costs (the threshold is what buys robustness to dropouts).

Accounting (Kairouz, Liu and Steinke 2021, the distributed discrete Gaussian, their
Proposition 14): the sum of ``t`` discrete Gaussians of variance ``s^2`` (in steps) on an
integer query of L2 sensitivity ``D`` has Renyi divergence of order ``a`` at most
``a D^2 / (2 t s^2) + tau d``, where ``tau = 10 sum_{k<t} exp(-2 pi^2 s^2 k / (k+1))`` and ``d``
is the number of coordinates. fedge computes ``tau d`` and refuses a round where it passes
``MAX_TAU_D`` (1e-12; it is 0.0 in float arithmetic once ``s`` is a few steps), so what is
left is the RDP curve of a Gaussian mechanism of multiplier ``z' = s sqrt(t) / D``, and the
ledger charges a :class:`dp_accounting.GaussianDpEvent` of ``z'``. Rounding to the grid can
lengthen an update by half a step per coordinate, so ``D = C / step + sqrt(d) / 2``, and
``z'`` is a little below ``z``. The wrap mod 2^32 and the division by ``m`` are
post-processing.

Assumptions, stated: agents are honest about their noise and the coordinator is semi-honest
(it relays and does not lie about who uploaded); one agent colluding with the coordinator
removes its own share of the noise. Neighbouring datasets differ in the content of one
agent's update (zero-out): that an agent took part is visible anyway. No amplification by
sampling (see :mod:`coordinator.accountant`). Adaptive clipping is refused: it needs each
agent's clipped-or-not bit, which the coordinator would see in the clear.
"""

from __future__ import annotations

import math

from coordinator.dp import DpOptions
from protocol.errors import ConfigError
from protocol.messages.secagg import SecAggParams
from protocol.secagg import check_overflow, noise_steps

__all__ = [
    "DISTRIBUTED_ACCOUNTING",
    "accounted_multiplier",
    "check_distributed_plan",
    "check_ring",
    "round_params",
]

DISTRIBUTED_ACCOUNTING = (
    "rdp, no sampling amplification; distributed discrete Gaussian (agents' noise, at least "
    "threshold shares), zero-out neighbours"
)
# The analysis of the discrete Gaussian needs a std of at least half a step; ask for more.
MIN_NOISE_STEPS = 1.0
# Largest correction ``tau d`` (added to every RDP order) that the accountant may leave out.
MAX_TAU_D = 1e-12


def check_distributed_plan(options: DpOptions, params: SecAggParams) -> None:
    """Refuse, naming why, DP settings that secure aggregation cannot honour."""
    if options.adaptive:
        raise ConfigError(
            "adaptive clipping counts the agents whose update was clipped, and with secure "
            "aggregation that bit would reach the coordinator in the clear, agent by agent: "
            "use fixed clipping (dp_adaptive=false) with secure aggregation",
            reason="secagg_dp_adaptive",
        )
    _checked_steps(options, params, options.clip_norm)
    # The same check as at every round, on one coordinate: fails early on a coarse grid.
    accounted_multiplier(options, params, clip_norm=options.clip_norm, length=1)


def round_params(
    params: SecAggParams, options: DpOptions | None, clip_norm: float | None
) -> SecAggParams:
    """The round's secure aggregation settings, with each agent's noise std when DP is on."""
    if options is None or clip_norm is None:
        return params
    stddev = options.update_noise_multiplier * clip_norm / math.sqrt(params.threshold)
    return params.model_copy(update={"dp_noise_stddev": stddev})


def check_ring(agents: int, params: SecAggParams) -> None:
    """Refuse a round whose sum, noise included, could wrap around the 2^32 ring."""
    steps = noise_steps(
        params.dp_noise_stddev, clip=params.clip_range, levels=params.quantisation_levels
    )
    check_overflow(agents, params.quantisation_levels, steps)


def accounted_multiplier(
    options: DpOptions, params: SecAggParams, *, clip_norm: float, length: int
) -> float:
    """The Gaussian noise multiplier a round of ``length`` coordinates is charged as."""
    sigma = _checked_steps(options, params, clip_norm)
    step = 2.0 * params.clip_range / params.quantisation_levels
    sensitivity = clip_norm / step + math.sqrt(length) / 2.0
    t = params.threshold
    tau = 10.0 * sum(math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, t))
    if tau * length > MAX_TAU_D:
        raise ConfigError(
            f"each agent's DP noise is only {sigma:.3g} quantisation steps: the sum of "
            f"discrete Gaussians would not be charged as a Gaussian (tau x d = "
            f"{tau * length:.3g}); raise secagg_quantisation_levels",
            reason="bad_dp",
        )
    return sigma * math.sqrt(t) / sensitivity


def _checked_steps(options: DpOptions, params: SecAggParams, clip_norm: float) -> float:
    noisy = round_params(params, options, clip_norm)
    sigma = noise_steps(
        noisy.dp_noise_stddev, clip=params.clip_range, levels=params.quantisation_levels
    )
    if sigma < MIN_NOISE_STEPS:
        raise ConfigError(
            f"each agent's DP noise ({noisy.dp_noise_stddev:.3g}) is under one quantisation "
            f"step ({2 * params.clip_range / params.quantisation_levels:.3g}): raise "
            "secagg_quantisation_levels or lower secagg_clip_range",
            reason="bad_dp",
        )
    return sigma
