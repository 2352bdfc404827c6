"""Update validation: every refusal reason, the norm bounds, and what passes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.validation import DEFAULT_MAX_RELATIVE_NORM, update_norm, validate_update
from protocol.errors import ConfigError, ProtocolError


@pytest.fixture
def reference() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=(3, 3, 1, 4)).astype(np.float32),
        np.zeros(4, np.float32),
        rng.normal(size=(16, 10)).astype(np.float32),
        np.zeros(10, np.float32),
    ]


def _trained(reference: list[np.ndarray], scale: float = 0.01) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(w + rng.normal(scale=scale, size=w.shape)).astype(np.float32) for w in reference]


def test_a_trained_update_passes(reference: list[np.ndarray]) -> None:
    validate_update(_trained(reference), reference=reference)
    validate_update(_trained(reference), reference=reference, max_norm=1.0)
    # float16 updates (the float16 wire encoding) are floats too
    validate_update(
        [w.astype(np.float16) for w in _trained(reference)], reference=reference, max_norm=1.0
    )
    assert update_norm(_trained(reference), reference) < 1.0


def test_wrong_count(reference: list[np.ndarray]) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_update(_trained(reference)[:3], reference=reference)
    assert info.value.reason == "wrong_count"
    assert "3" in str(info.value)
    assert "4" in str(info.value)


def test_wrong_shape_names_the_tensor_and_both_shapes(reference: list[np.ndarray]) -> None:
    weights = _trained(reference)
    weights[2] = weights[2].T
    with pytest.raises(ProtocolError) as info:
        validate_update(weights, reference=reference)
    assert info.value.reason == "wrong_shape"
    assert "tensor 2" in str(info.value)
    assert "(10, 16)" in str(info.value)
    assert "(16, 10)" in str(info.value)


@pytest.mark.parametrize(
    "tensor",
    [np.zeros(4, np.int32), np.zeros(4, np.bool_), np.zeros(4, np.complex64)],
)
def test_wrong_dtype(reference: list[np.ndarray], tensor: np.ndarray) -> None:
    weights = _trained(reference)
    weights[1] = tensor
    with pytest.raises(ProtocolError) as info:
        validate_update(weights, reference=reference)
    assert info.value.reason == "wrong_dtype"
    assert "tensor 1" in str(info.value)


def test_something_that_is_not_an_array_is_a_wrong_dtype(reference: list[np.ndarray]) -> None:
    weights: list[object] = list(_trained(reference))
    weights[1] = [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ProtocolError) as info:
        validate_update(weights, reference=reference)  # type: ignore[arg-type]
    assert info.value.reason == "wrong_dtype"
    assert "list" in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_not_finite_names_the_tensor(reference: list[np.ndarray], bad: float) -> None:
    weights = _trained(reference)
    weights[3][7] = bad
    with pytest.raises(ProtocolError) as info:
        # even with the norm bounds off: NaN would poison the mean
        validate_update(weights, reference=reference, max_relative_norm=None)
    assert info.value.reason == "not_finite"
    assert "tensor 3" in str(info.value)


def test_norm_above_max_norm(reference: list[np.ndarray]) -> None:
    weights = _trained(reference, scale=1.0)
    norm = update_norm(weights, reference)
    validate_update(weights, reference=reference, max_norm=norm * 1.01)
    with pytest.raises(ProtocolError) as info:
        validate_update(weights, reference=reference, max_norm=norm * 0.99)
    assert info.value.reason == "norm_too_large"
    assert "max_norm" in str(info.value)


def test_norm_above_the_relative_bound(reference: list[np.ndarray]) -> None:
    reference_norm = math.sqrt(sum(float(np.sum(w.astype(np.float64) ** 2)) for w in reference))
    # every coordinate moves by the same amount, so the delta norm is known exactly
    size = sum(w.size for w in reference)
    step = 2.0 * reference_norm / math.sqrt(size)
    weights = [(w + step).astype(np.float32) for w in reference]
    assert update_norm(weights, reference) == pytest.approx(2.0 * reference_norm, rel=1e-5)

    validate_update(weights, reference=reference, max_relative_norm=2.1)
    with pytest.raises(ProtocolError) as info:
        validate_update(weights, reference=reference, max_relative_norm=1.9)
    assert info.value.reason == "norm_too_large"
    assert "global weights' norm" in str(info.value)


def test_the_default_relative_bound_refuses_a_wild_update(reference: list[np.ndarray]) -> None:
    weights = [(w + 1e4).astype(np.float32) for w in reference]
    assert update_norm(weights, reference) > DEFAULT_MAX_RELATIVE_NORM * 10
    with pytest.raises(ProtocolError) as info:
        validate_update(weights, reference=reference)
    assert info.value.reason == "norm_too_large"
    validate_update(weights, reference=reference, max_relative_norm=None)


def test_an_all_zero_reference_needs_an_absolute_bound_instead() -> None:
    # relative to a zero model any step is infinitely large
    reference = [np.zeros(3, np.float32)]
    with pytest.raises(ProtocolError):
        validate_update([np.full(3, 1e-3, np.float32)], reference=reference)
    validate_update(
        [np.full(3, 1e-3, np.float32)], reference=reference, max_norm=1.0, max_relative_norm=None
    )


def test_huge_float64_values_are_refused_without_a_warning() -> None:
    reference = [np.zeros(2, np.float32)]
    weights = [np.array([1e200, -1e200])]
    assert update_norm(weights, reference) == math.inf
    with pytest.raises(ProtocolError) as info:
        validate_update(weights, reference=reference, max_norm=1e300, max_relative_norm=None)
    assert info.value.reason == "norm_too_large"


def test_update_norm_is_the_norm_of_the_whole_delta(reference: list[np.ndarray]) -> None:
    weights = _trained(reference, scale=0.5)
    delta = np.concatenate(
        [
            (w.astype(np.float64) - r.astype(np.float64)).ravel()
            for w, r in zip(weights, reference, strict=True)
        ]
    )
    assert update_norm(weights, reference) == pytest.approx(float(np.linalg.norm(delta)))
    assert update_norm(reference, reference) == 0.0
    with pytest.raises(ProtocolError) as info:
        update_norm(weights[:2], reference)
    assert info.value.reason == "wrong_count"


@pytest.mark.parametrize("limit", [0.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("name", ["max_norm", "max_relative_norm"])
def test_a_bound_that_cannot_work_is_a_config_error(
    reference: list[np.ndarray], name: str, limit: float
) -> None:
    with pytest.raises(ConfigError, match=name):
        validate_update(reference, reference=reference, **{name: limit})
