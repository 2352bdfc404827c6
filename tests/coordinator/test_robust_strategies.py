"""Robust aggregation: trimmed mean, coordinate median and norm clipping."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest

from coordinator.strategies import (
    Aggregation,
    ClientUpdate,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedProx,
    NormClipping,
    TrimmedMean,
)
from coordinator.validation import update_norm
from protocol.errors import ConfigError
from tests.coordinator.strategy_cases import (
    _aggregate,
    _model,
    _scalars,
    _updates,
)

# --- robust aggregation --------------------------------------------------------------------


def test_trimmed_mean_drops_an_outlier_that_fedavg_follows() -> None:
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1.0, 1e6]
    trimmed = _aggregate(TrimmedMean(beta=0.1), [np.zeros(1, np.float32)], _scalars(*values))
    averaged = _aggregate(FedAvg(), [np.zeros(1, np.float32)], _scalars(*values))
    # beta 0.1 of 10: the largest (the outlier) and the smallest (0.9) go.
    assert float(trimmed[0][0]) == pytest.approx(sum(sorted(values)[1:-1]) / 8, rel=1e-6)
    assert float(averaged[0][0]) > 1e4


def test_trimmed_mean_is_coordinate_wise() -> None:
    updates = [
        ClientUpdate(f"a{i}", [np.array([i, 10.0 - i], np.float32)], num_examples=1 + 99 * i)
        for i in range(1, 11)
    ]
    result = _aggregate(TrimmedMean(beta=0.2), [np.zeros(2, np.float32)], updates)
    # each coordinate keeps its own middle six values (3..8 and 2..7), unweighted
    np.testing.assert_allclose(result[0], [5.5, 4.5], rtol=1e-6)


def test_trimmed_mean_with_beta_zero_is_the_plain_mean() -> None:
    result = _aggregate(TrimmedMean(beta=0.0), [np.zeros(1, np.float32)], _scalars(1, 2, 6))
    np.testing.assert_allclose(result[0], [3.0])


def test_trimmed_mean_always_keeps_a_value() -> None:
    result = _aggregate(TrimmedMean(beta=0.49), [np.zeros(1, np.float32)], _scalars(1, 2))
    np.testing.assert_allclose(result[0], [1.5])


@pytest.mark.parametrize(
    ("values", "expected"),
    [((1.0, 5.0, 2.0), 2.0), ((1.0, 5.0, 2.0, 10.0), 3.5), ((7.0,), 7.0)],
)
def test_coordinate_median_of_odd_and_even_counts(
    values: tuple[float, ...], expected: float
) -> None:
    result = _aggregate(CoordinateMedian(), [np.zeros(1, np.float32)], _scalars(*values))
    assert result[0].dtype == np.float32
    np.testing.assert_array_equal(result[0], [expected])


def test_coordinate_median_of_float32_extremes_does_not_overflow() -> None:
    top = float(np.finfo(np.float32).max)
    result = _aggregate(CoordinateMedian(), [np.zeros(1, np.float32)], _scalars(top, top))
    np.testing.assert_array_equal(result[0], [top])


# --- norm clipping -------------------------------------------------------------------------


def test_norm_clipping_bounds_a_huge_update_and_keeps_its_direction() -> None:
    rng = np.random.default_rng(6)
    global_weights = _model(rng)
    huge = [(w + rng.normal(scale=50.0, size=w.shape)).astype(np.float32) for w in global_weights]
    assert update_norm(huge, global_weights) > 100.0

    result = _aggregate(
        NormClipping(FedAvg(), max_norm=2.0),
        global_weights,
        [ClientUpdate("a", huge, 10)],
    )

    assert update_norm(result, global_weights) == pytest.approx(2.0, rel=1e-4)
    direction = np.concatenate([(h - g).ravel() for h, g in zip(huge, global_weights, strict=True)])
    moved = np.concatenate([(r - g).ravel() for r, g in zip(result, global_weights, strict=True)])
    cosine = direction @ moved / (np.linalg.norm(direction) * np.linalg.norm(moved))
    assert cosine == pytest.approx(1.0, abs=1e-5)


def test_norm_clipping_leaves_a_small_update_unchanged() -> None:
    rng = np.random.default_rng(7)
    global_weights = _model(rng)
    (update,) = _updates(rng, global_weights, 1)
    assert update_norm(update.weights, global_weights) < 10.0

    result = _aggregate(NormClipping(FedAvg(), max_norm=10.0), global_weights, [update])

    for got, sent in zip(result, update.weights, strict=True):
        np.testing.assert_array_equal(got, sent)


def test_norm_clipping_limits_the_pull_of_one_agent_on_the_mean() -> None:
    honest = _scalars(1.0, 1.0, 1.0)
    attacker = ClientUpdate("evil", [np.array([1e6], np.float32)], 1)
    result = _aggregate(
        NormClipping(FedAvg(), max_norm=3.0), [np.zeros(1, np.float32)], [*honest, attacker]
    )
    np.testing.assert_allclose(result[0], [1.5], rtol=1e-6)


def test_norm_clipping_streams_and_delegates_to_its_inner_strategy() -> None:
    inner = FedProx(mu=0.5)
    clipped = NormClipping(inner, max_norm=1.0)
    assert clipped.round_config_overrides() == {"proximal_mu": 0.5}

    adam = FedAdam()
    wrapped = NormClipping(adam, max_norm=1.0)
    _aggregate(wrapped, [np.zeros(1, np.float32)], _scalars(5.0))
    assert wrapped.state_dict()["steps"] == 1
    wrapped.load_state_dict(adam.state_dict())

    rng = np.random.default_rng(8)
    global_weights = _model(rng)
    aggregation: Aggregation = NormClipping(FedAvg(), max_norm=0.5).begin(global_weights)
    watchers: list[weakref.ref[np.ndarray]] = []
    for update in _updates(rng, global_weights, 10):
        aggregation.add(update)
        watchers.extend(weakref.ref(w) for w in update.weights)
    del update
    gc.collect()
    assert all(watch() is None for watch in watchers)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf])
def test_norm_clipping_needs_a_positive_finite_bound(max_norm: float) -> None:
    with pytest.raises(ConfigError, match="max_norm"):
        NormClipping(FedAvg(), max_norm=max_norm)
