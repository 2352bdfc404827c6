"""Distributed DP under secure aggregation, in memory: the noise, the ring, the accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from coordinator.distributed_dp import (
    accounted_multiplier,
    check_distributed_plan,
    check_ring,
    round_params,
)
from coordinator.dp import DpOptions
from protocol.errors import ConfigError
from protocol.messages.secagg import SecAggParams, UnmaskRequest
from protocol.secagg import dequantise_sum, discrete_gaussian, quantise
from tests.coordinator.test_secagg import shared_round

PARAMS = SecAggParams(threshold=3, degree=6, clip_range=0.5, quantisation_levels=2**20)
OPTIONS = DpOptions(noise_multiplier=1.1, clip_norm=0.3)


@pytest.mark.parametrize("sigma", [0.8, 3.0, 250.0, 20_000.0])
def test_the_discrete_gaussian_has_the_asked_spread(sigma: float) -> None:
    draws = discrete_gaussian(sigma, 200_000, np.random.default_rng(1))
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(draws.size)
    # The std of a sample of 200,000 is within 0.2% of the true one (1 sigma): allow 1%.
    assert abs(draws.std() / sigma - 1.0) < 0.01


def test_the_discrete_gaussian_has_the_exact_probabilities() -> None:
    sigma = 1.5
    draws = discrete_gaussian(sigma, 100_000, np.random.default_rng(2))
    support = np.arange(-8, 9)
    pmf = np.exp(-(support**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    observed = np.array([(draws == k).sum() for k in support])
    assert observed.sum() == draws.size  # nothing past 8 sigma / 1.5
    assert stats.chisquare(observed, pmf * draws.size).pvalue > 1e-3


def test_noise_below_zero_wraps_and_is_read_back() -> None:
    values = np.array([-0.5, -0.49, 0.0, 0.2, 0.5])
    levels = 2**10
    total = np.zeros(values.size, np.uint32)
    noise = np.array([-5000, -3, 0, 7, 9000], np.int64)
    for _ in range(3):
        total += quantise(values, clip=0.5, levels=levels)
    total += (noise % 2**32).astype(np.uint32)
    step = 1.0 / levels
    recovered = dequantise_sum(total, agents=3, clip=0.5, levels=levels)
    assert np.max(np.abs(recovered - (3 * values + noise * step))) <= 3 * step / 2 + 1e-12


@pytest.mark.parametrize("dropping", [0, 1, 2], ids=["none", "one", "a-third"])
def test_the_unmasked_sum_carries_every_survivors_noise_share(dropping: int) -> None:
    length = 20_000
    params = round_params(PARAMS, OPTIONS, OPTIONS.clip_norm)
    assert params.dp_noise_stddev == pytest.approx(1.1 * 0.3 / math.sqrt(3))
    names = [f"agent-{i:02d}" for i in range(6)]
    clients, server = shared_round(names, params, 3, length)
    rng = np.random.default_rng(3)
    updates = {n: rng.normal(0.0, 0.3 / math.sqrt(length), length) for n in names}
    survivors = names[: 6 - dropping]  # the others drop at the upload, after sharing
    for name in survivors:
        server.add_masked(name, clients[name].masked(updates[name]))
    request = server.unmask_request()
    dropped = tuple(names[6 - dropping :])
    assert request == UnmaskRequest(round=3, survivors=tuple(survivors), dropped=dropped)
    for name in survivors:
        server.add_revealed(clients[name].on_unmask(request))
    total, count = server.result()
    assert count == len(survivors)
    noise = total - sum(updates[n] for n in survivors)
    expected = params.dp_noise_stddev * math.sqrt(count)
    assert expected >= OPTIONS.noise_multiplier * OPTIONS.clip_norm  # at least zC, dropped or not
    assert abs(noise.std() / expected - 1.0) < 0.03
    assert abs(noise.mean()) < 5 * expected / math.sqrt(length)


def test_the_accounted_multiplier_pays_for_the_grid() -> None:
    params = round_params(PARAMS, OPTIONS, OPTIONS.clip_norm)
    length = 8714
    step = 2 * PARAMS.clip_range / PARAMS.quantisation_levels
    sigma = params.dp_noise_stddev / step
    sensitivity = OPTIONS.clip_norm / step + math.sqrt(length) / 2
    expected = sigma * math.sqrt(PARAMS.threshold) / sensitivity
    got = accounted_multiplier(OPTIONS, PARAMS, clip_norm=OPTIONS.clip_norm, length=length)
    assert got == pytest.approx(expected, rel=1e-12)
    assert 0.999 * OPTIONS.noise_multiplier < got < OPTIONS.noise_multiplier


def test_what_distributed_dp_cannot_honour_is_refused() -> None:
    adaptive = DpOptions(noise_multiplier=1.0, clip_norm=0.3, adaptive=True)
    with pytest.raises(ConfigError) as caught:
        check_distributed_plan(adaptive, PARAMS)
    assert caught.value.reason == "secagg_dp_adaptive"
    coarse = PARAMS.model_copy(update={"quantisation_levels": 4})
    with pytest.raises(ConfigError, match="under one quantisation step"):
        check_distributed_plan(OPTIONS, coarse)
    # About 1.5 steps of noise: over one step, but the sum is not yet charged as a Gaussian.
    grainy = PARAMS.model_copy(update={"quantisation_levels": 8})
    with pytest.raises(ConfigError, match="tau x d"):
        accounted_multiplier(OPTIONS, grainy, clip_norm=OPTIONS.clip_norm, length=8714)
    check_distributed_plan(OPTIONS, PARAMS)
    # The ring must hold the noise's tails too, not only the quantised updates.
    tight = PARAMS.model_copy(update={"quantisation_levels": 2**32 // 1000 - 1})
    check_ring(1000, tight)
    with pytest.raises(ConfigError) as overflow:
        check_ring(1000, round_params(tight, OPTIONS, OPTIONS.clip_norm))
    assert overflow.value.reason == "secagg_overflow"


def test_start_options_combine_dp_with_secure_aggregation() -> None:
    from coordinator.daemon import plan_from_command
    from protocol.messages.commands import StartRounds

    options: dict[str, str | int | float | bool] = {
        "secure_aggregation": True,
        "dp_noise_multiplier": 1.0,
        "dp_clip_norm": 0.5,
    }
    plan = plan_from_command(StartRounds(command_id="d1", strategy="fedavg", options=options))
    assert plan.privacy == DpOptions(noise_multiplier=1.0, clip_norm=0.5)
    assert plan.secure_aggregation is not None
    with pytest.raises(ConfigError) as caught:
        plan_from_command(
            StartRounds(
                command_id="d2", strategy="fedavg", options={**options, "dp_adaptive": True}
            )
        )
    assert caught.value.reason == "secagg_dp_adaptive"
