"""Server optimisers on FedAvg's pseudo-gradient: FedAdam and FedYogi."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.strategies import (
    ClientUpdate,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    StrategyState,
    TrimmedMean,
    make_strategy,
)
from protocol.errors import ConfigError
from protocol.tensors import decode_tensors, encode_tensors
from tests.coordinator.strategy_cases import (
    _aggregate,
    _model,
    _scalars,
    _updates,
)

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
