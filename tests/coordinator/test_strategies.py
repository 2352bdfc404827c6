"""Aggregation strategies: FedAvg, FedProx and the registry."""

from __future__ import annotations

import gc
import itertools
import math
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator.strategies import (
    ClientUpdate,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    NormClipping,
    TrimmedMean,
    make_strategy,
    strategy_names,
)
from protocol.errors import ConfigError, ProtocolError
from tests.coordinator.strategy_cases import (
    SHAPES,
    _aggregate,
    _arrays_reachable,
    _model,
    _updates,
)

# --- FedAvg --------------------------------------------------------------------------------


def test_fedavg_equals_the_explicit_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    global_weights = _model(rng)
    updates = _updates(rng, global_weights, 7)

    result = _aggregate(FedAvg(), global_weights, updates)

    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    for index, tensor in enumerate(result):
        stacked = np.stack([u.weights[index] for u in updates]).astype(np.float64)
        expected = np.tensordot(counts, stacked, axes=1) / counts.sum()
        assert tensor.dtype == np.float32
        assert tensor.shape == global_weights[index].shape
        np.testing.assert_allclose(tensor, expected, rtol=0, atol=1e-6)


def test_fedavg_does_not_depend_on_the_order_of_updates() -> None:
    rng = np.random.default_rng(1)
    global_weights = _model(rng)
    updates = _updates(rng, global_weights, 5)
    first = _aggregate(FedAvg(), global_weights, updates)

    for order in itertools.islice(itertools.permutations(updates), 1, 20):
        again = _aggregate(FedAvg(), global_weights, order)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_fedavg_keeps_one_running_sum_per_tensor_and_no_update() -> None:
    rng = np.random.default_rng(2)
    global_weights = _model(rng)
    aggregation = FedAvg().begin(global_weights)
    watchers: list[weakref.ref[np.ndarray]] = []
    for update in _updates(rng, global_weights, 40):
        aggregation.add(update)
        watchers.extend(weakref.ref(w) for w in update.weights)
    del update
    gc.collect()

    assert aggregation.count == 40
    # No update array survives once the caller lets go of it.
    assert all(watch() is None for watch in watchers)
    global_ids = {id(w) for w in global_weights}
    held = [a for a in _arrays_reachable(aggregation) if id(a) not in global_ids]
    assert sorted(a.shape for a in held) == sorted(SHAPES)
    assert all(a.dtype == np.float64 for a in held)


def test_a_finished_aggregation_returns_the_same_result_and_refuses_more() -> None:
    rng = np.random.default_rng(3)
    global_weights = _model(rng)
    updates = _updates(rng, global_weights, 3)
    aggregation = FedAvg().begin(global_weights)
    for update in updates[:2]:
        aggregation.add(update)

    first = aggregation.result()
    first[0][...] = 123.0  # the caller's copy, not the aggregation's
    second = aggregation.result()
    assert not np.any(second[0] == 123.0)

    with pytest.raises(ConfigError) as info:
        aggregation.add(updates[2])
    assert info.value.reason == "aggregation_finished"


def test_aggregating_nothing_is_a_config_error() -> None:
    for strategy in (FedAvg(), FedAdam(), TrimmedMean(), CoordinateMedian()):
        aggregation = strategy.begin([np.zeros(3, np.float32)])
        with pytest.raises(ConfigError) as info:
            aggregation.result()
        assert info.value.reason == "no_updates"


def test_an_agent_counts_only_once() -> None:
    aggregation = FedAvg().begin([np.zeros(1, np.float32)])
    update = ClientUpdate(agent="a", weights=[np.ones(1, np.float32)], num_examples=2)
    aggregation.add(update)
    with pytest.raises(ProtocolError) as info:
        aggregation.add(update)
    assert info.value.reason == "duplicate_update"
    assert aggregation.count == 1
    np.testing.assert_array_equal(aggregation.result()[0], [1.0])


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ([np.zeros(3, np.float32), np.zeros(1, np.float32)], "wrong_count"),
        ([np.zeros(4, np.float32)], "wrong_shape"),
        ([np.zeros(3, np.int32)], "wrong_dtype"),
        ([np.array([0.0, np.nan, 0.0], np.float32)], "not_finite"),
    ],
)
def test_an_update_that_does_not_fit_is_refused_and_not_counted(
    weights: list[np.ndarray], reason: str
) -> None:
    for strategy in (FedAvg(), TrimmedMean(), NormClipping(FedAvg(), max_norm=1.0)):
        aggregation = strategy.begin([np.zeros(3, np.float32)])
        with pytest.raises(ProtocolError) as info:
            aggregation.add(ClientUpdate(agent="a", weights=weights, num_examples=1))
        assert info.value.reason == reason
        assert aggregation.count == 0


@pytest.mark.parametrize("count", [0, -3, True, 2.5])
def test_num_examples_must_be_a_positive_integer(count: object) -> None:
    with pytest.raises(ProtocolError) as info:
        ClientUpdate(agent="a", weights=[], num_examples=count)  # type: ignore[arg-type]
    assert info.value.reason == "bad_num_examples"


def test_num_examples_may_be_a_numpy_integer() -> None:
    aggregation = FedAvg().begin([np.zeros(1, np.float32)])
    aggregation.add(ClientUpdate("a", [np.array([1.0], np.float32)], int(np.int64(1))))
    aggregation.add(ClientUpdate("b", [np.array([4.0], np.float32)], np.int64(2)))  # type: ignore[arg-type]
    np.testing.assert_array_equal(aggregation.result()[0], [3.0])


def test_fedavg_keeps_float16_updates_in_the_global_dtype() -> None:
    aggregation = FedAvg().begin([np.zeros(2, np.float32)])
    aggregation.add(ClientUpdate("a", [np.array([1.0, 2.0], np.float16)], 1))
    aggregation.add(ClientUpdate("b", [np.array([3.0, 4.0], np.float32)], 1))
    result = aggregation.result()
    assert result[0].dtype == np.float32
    np.testing.assert_array_equal(result[0], [2.0, 3.0])


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    copies=st.integers(1, 5),
    name=st.sampled_from(["fedavg", "trimmed_mean", "median"]),
)
def test_aggregating_identical_updates_returns_them(
    data: st.DataObject, copies: int, name: str
) -> None:
    shapes = data.draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), max_size=3))
    elements = st.floats(width=32, allow_nan=False, allow_infinity=False)
    weights = [
        data.draw(hnp.arrays(np.float32, shape, elements=elements)) for shape in [(1,), *shapes]
    ]
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=copies, max_size=copies))
    updates = [
        ClientUpdate(agent=f"a{i}", weights=weights, num_examples=n) for i, n in enumerate(counts)
    ]

    result = _aggregate(make_strategy(name), [np.zeros_like(w) for w in weights], updates)

    for got, expected in zip(result, weights, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


# --- FedProx -------------------------------------------------------------------------------


def test_fedprox_aggregates_like_fedavg_and_sends_mu_to_agents() -> None:
    rng = np.random.default_rng(4)
    global_weights = _model(rng)
    updates = _updates(rng, global_weights, 4)
    strategy = FedProx(mu=0.25)

    assert strategy.round_config_overrides() == {"proximal_mu": 0.25}
    assert FedAvg().round_config_overrides() == {}
    for a, b in zip(
        _aggregate(strategy, global_weights, updates),
        _aggregate(FedAvg(), global_weights, updates),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mu", [-0.1, 100.5, math.nan])
def test_fedprox_refuses_a_mu_the_round_config_cannot_carry(mu: float) -> None:
    with pytest.raises(ConfigError, match="mu"):
        FedProx(mu=mu)


# --- registry ------------------------------------------------------------------------------


def test_make_strategy_knows_every_name() -> None:
    expected = {
        "fedavg": FedAvg,
        "fedprox": FedProx,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "trimmed_mean": TrimmedMean,
        "median": CoordinateMedian,
    }
    assert set(strategy_names()) == set(expected)
    for name, kind in expected.items():
        strategy = make_strategy(name)
        assert type(strategy) is kind
        assert strategy.name == name


def test_make_strategy_passes_options_and_wraps_with_clipping() -> None:
    prox = make_strategy("fedprox", mu="0.3")
    assert prox.round_config_overrides() == {"proximal_mu": 0.3}

    adam = make_strategy("fedadam", eta=0.5, tau=1e-6, clip_norm=4)
    assert isinstance(adam, NormClipping)
    assert adam.max_norm == 4.0
    assert isinstance(adam.inner, FedAdam)
    assert (adam.inner.eta, adam.inner.beta_1, adam.inner.tau) == (0.5, 0.9, 1e-6)

    trimmed = make_strategy("trimmed_mean", beta=0.2)
    assert isinstance(trimmed, TrimmedMean)
    assert trimmed.beta == 0.2


def test_make_strategy_refuses_an_unknown_name_and_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy("fedsgd")
    assert info.value.reason == "unknown_strategy"
    for name in strategy_names():
        assert name in str(info.value)


def test_make_strategy_refuses_an_unknown_option_and_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy("fedyogi", eta=0.1, momentum=0.9)
    assert info.value.reason == "unknown_option"
    message = str(info.value)
    assert "momentum" in message
    for option in ("eta", "beta_1", "beta_2", "tau", "clip_norm"):
        assert option in message

    with pytest.raises(ConfigError, match="valid options: clip_norm"):
        make_strategy("median", beta=0.1)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedadam", {"eta": "fast"}),
        ("fedadam", {"eta": True}),
        ("fedadam", {"eta": 0.0}),
        ("fedadam", {"beta_1": 1.0}),
        ("fedyogi", {"tau": "-1"}),
        ("trimmed_mean", {"beta": 0.5}),
        ("trimmed_mean", {"beta": "nan"}),
        ("fedavg", {"clip_norm": 0}),
        ("fedprox", {"mu": -1}),
    ],
)
def test_make_strategy_refuses_bad_values(name: str, options: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy(name, **options)  # type: ignore[arg-type]
    assert info.value.reason == "bad_option"
