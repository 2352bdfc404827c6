"""Aggregation strategies: FedAvg and friends, robust means, clipping, the registry."""

from __future__ import annotations

import gc
import itertools
import math
import types
import weakref
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator.strategies import (
    Aggregation,
    ClientUpdate,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    NormClipping,
    Strategy,
    StrategyState,
    TrimmedMean,
    make_strategy,
    strategy_names,
)
from coordinator.validation import update_norm
from protocol.errors import ConfigError, ProtocolError
from protocol.tensors import decode_tensors, encode_tensors

# Keras get_weights() order of a small conv net: kernel, bias, dense kernel, bias.
SHAPES = [(3, 3, 1, 4), (4,), (16, 10), (10,)]


def _model(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]


def _updates(
    rng: np.random.Generator, global_weights: Sequence[np.ndarray], count: int
) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            agent=f"agent-{i}",
            weights=[
                (w + rng.normal(scale=0.1, size=w.shape)).astype(np.float32) for w in global_weights
            ],
            num_examples=int(rng.integers(1, 200)),
        )
        for i in range(count)
    ]


def _aggregate(
    strategy: Strategy, global_weights: Sequence[np.ndarray], updates: Sequence[ClientUpdate]
) -> list[np.ndarray]:
    aggregation = strategy.begin(global_weights)
    for update in updates:
        aggregation.add(update)
    assert aggregation.count == len(updates)
    return aggregation.result()


def _scalars(*values: float) -> list[ClientUpdate]:
    """One update per value, a one-element model, equal weights."""
    return [
        ClientUpdate(agent=f"a{i}", weights=[np.array([v], np.float32)], num_examples=1)
        for i, v in enumerate(values)
    ]


def _arrays_reachable(root: object) -> list[np.ndarray]:
    """Every ndarray reachable from ``root`` through instances and containers."""
    skip = (type, types.ModuleType, types.BuiltinFunctionType)
    seen: set[int] = set()
    found: list[np.ndarray] = []
    stack: list[object] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            found.append(obj)
            continue
        if isinstance(obj, types.FunctionType):
            # what a closure holds, not the module globals every function can reach
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ())
            continue
        stack.extend(gc.get_referents(obj))
    return found


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


# --- FedAdam / FedYogi ---------------------------------------------------------------------

ETA, BETA_1, BETA_2, TAU = 0.1, 0.9, 0.99, 1e-3


def _f32(values: list[float] | list[list[float]]) -> np.ndarray:
    return np.array(values, np.float32)


def _server_opt_by_hand(
    kind: str, global_value: float, mean: float, moments: tuple[float, float] | None
) -> tuple[float, tuple[float, float]]:
    """One coordinate of Reddi et al.'s Algorithm 2, in plain Python floats."""
    m, v = moments if moments is not None else (0.0, TAU**2)
    delta = mean - global_value
    m = BETA_1 * m + (1 - BETA_1) * delta
    if kind == "fedadam":
        v = BETA_2 * v + (1 - BETA_2) * delta**2
    else:
        sign = (v > delta**2) - (v < delta**2)
        v = v - (1 - BETA_2) * delta**2 * sign
    return global_value + ETA * m / (math.sqrt(v) + TAU), (m, v)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_server_optimisers_match_a_hand_computed_reference(kind: str) -> None:
    strategy = make_strategy(kind, eta=ETA, beta_1=BETA_1, beta_2=BETA_2, tau=TAU)
    global_weights = [np.array([0.0, 1.0], np.float32), np.array([[2.0]], np.float32)]
    rounds = [
        # (update of agent a with 1 example, update of agent b with 3 examples)
        ([_f32([1.0, 1.0]), _f32([[2.0]])], [_f32([3.0, 0.0]), _f32([[4.0]])]),
        ([_f32([-1.0, 2.0]), _f32([[2.0]])], [_f32([0.0, 2.0]), _f32([[1.0]])]),
    ]
    moments: list[tuple[float, float] | None] = [None, None, None]
    for round_index, (a, b) in enumerate(rounds):
        updates = [ClientUpdate("a", a, 1), ClientUpdate("b", b, 3)]
        flat_global = [float(x) for w in global_weights for x in w.ravel()]
        flat_a = [float(x) for t in a for x in t.ravel()]
        flat_b = [float(x) for t in b for x in t.ravel()]
        expected = []
        for i, g in enumerate(flat_global):
            value, moments[i] = _server_opt_by_hand(
                kind, g, (flat_a[i] + 3 * flat_b[i]) / 4, moments[i]
            )
            expected.append(value)

        result = _aggregate(strategy, global_weights, updates)

        got = [float(x) for w in result for x in w.ravel()]
        assert all(w.dtype == np.float32 for w in result)
        assert got == pytest.approx(expected, rel=1e-6)
        if round_index == 0:
            # delta 2.5: m = 0.25, v = 0.99e-6 (adam) or 1e-6 (yogi) + 0.0625
            assert got[0] == pytest.approx(0.0996008, rel=1e-5)
        global_weights = result
    assert strategy.state_dict()["steps"] == 2


def test_fedyogi_and_fedadam_differ_once_the_gradient_shrinks() -> None:
    results = {}
    for kind in ("fedadam", "fedyogi"):
        strategy = make_strategy(kind)
        weights = [np.zeros(1, np.float32)]
        for value in (10.0, 0.01, 0.01):
            weights = _aggregate(strategy, weights, _scalars(float(weights[0][0]) + value))
        results[kind] = float(weights[0][0])
    # Yogi's v decays additively, so it stays larger and its steps smaller than Adam's.
    assert results["fedyogi"] < results["fedadam"]


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_a_resumed_server_optimiser_continues_exactly(kind: str) -> None:
    rng = np.random.default_rng(5)
    weights = _model(rng)
    rounds = [_updates(rng, weights, 3) for _ in range(3)]
    original = make_strategy(kind)
    for updates in rounds[:2]:
        weights = _aggregate(original, weights, updates)

    state = original.state_dict()
    state["m"][0][...] = 0.0  # type: ignore[index]  # a copy: the strategy must not see this
    # persisted the way the coordinator stores arrays: the float32 tensor codec
    persisted: StrategyState = {}
    for key, value in original.state_dict().items():
        if isinstance(value, list):
            assert all(t.dtype == np.float32 for t in value)
            decoded = decode_tensors(encode_tensors({f"t{i}": t for i, t in enumerate(value)}))
            persisted[key] = [decoded[f"t{i}"] for i in range(len(value))]
        else:
            persisted[key] = value
    resumed = make_strategy(kind)
    resumed.load_state_dict(persisted)

    expected = _aggregate(original, weights, rounds[2])
    got = _aggregate(resumed, weights, rounds[2])
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    for key in ("m", "v"):
        for a, b in zip(original.state_dict()[key], resumed.state_dict()[key], strict=True):  # type: ignore[arg-type]
            np.testing.assert_array_equal(a, b)


def test_result_steps_the_optimiser_once_however_often_it_is_read() -> None:
    strategy = FedAdam()
    aggregation = strategy.begin([np.zeros(1, np.float32)])
    aggregation.add(_scalars(1.0)[0])
    first = aggregation.result()
    np.testing.assert_array_equal(first[0], aggregation.result()[0])
    assert strategy.state_dict()["steps"] == 1


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"m": [], "v": []},
        {"m": [np.zeros(2)], "v": [np.zeros(3)], "steps": 1},
        {"m": [np.zeros(2)], "v": [np.full(2, np.nan)], "steps": 1},
        {"m": [np.zeros(2)], "v": [np.full(2, -1.0)], "steps": 1},
        {"m": [np.zeros(2)], "v": [np.zeros(2)], "steps": -1},
        {"m": [np.zeros(2)], "v": [np.zeros(2)], "steps": 1, "extra": 2},
    ],
)
def test_a_broken_optimiser_state_is_refused(state: dict[str, object]) -> None:
    strategy = FedYogi()
    with pytest.raises(ConfigError) as info:
        strategy.load_state_dict(state)  # type: ignore[arg-type]
    assert info.value.reason == "bad_state"
    assert strategy.state_dict() == {"m": [], "v": [], "steps": 0}


def test_optimiser_state_for_another_model_is_refused_at_begin() -> None:
    strategy = FedAdam()
    strategy.load_state_dict({"m": [np.zeros(2)], "v": [np.ones(2)], "steps": 4})
    with pytest.raises(ConfigError) as info:
        strategy.begin([np.zeros(3, np.float32)])
    assert info.value.reason == "state_mismatch"


def test_stateless_strategies_have_empty_state_and_refuse_any() -> None:
    for strategy in (FedAvg(), FedProx(), TrimmedMean(), CoordinateMedian()):
        assert strategy.state_dict() == {}
        strategy.load_state_dict({})
        with pytest.raises(ConfigError):
            strategy.load_state_dict({"m": []})


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
