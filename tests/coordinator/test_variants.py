"""int8 variants: agents' activation ranges, merged, calibrate as well as the central set."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from coordinator.models import get_model_definition
from coordinator.reference import load_digits_split
from coordinator.serving_files import export_serving_tflite, flatbuffer_breakdown
from coordinator.variants import (
    carried_over,
    merge_ranges,
    quantize_int8,
    serving_variants,
    tflite_accuracy,
)
from protocol.messages.variants import ActivationRanges, TensorRange
from runtime.calibration import measure_activation_ranges


@pytest.fixture(scope="module")
def trained() -> tuple[bytes, Any]:
    import keras

    keras.utils.set_random_seed(3)
    split = load_digits_split()
    model = get_model_definition("digits_cnn").build_keras()
    model.fit(split.x_train, split.y_train, epochs=10, batch_size=32, verbose=0)
    return export_serving_tflite(model), split


@pytest.fixture(scope="module")
def untrained() -> bytes:
    """The initial release's float model: zero biases, which the converter folds away."""
    import keras

    keras.utils.set_random_seed(0)
    return export_serving_tflite(get_model_definition("digits_cnn").build_keras())


def test_merged_agent_ranges_equal_central_ranges_and_calibrate_as_well(
    trained: tuple[bytes, Any],
) -> None:
    float_model, split = trained
    images = split.x_train[:240]
    # Three agents, each with its own slice of the same images.
    per_agent = [measure_activation_ranges(float_model, part) for part in np.split(images, 3)]
    merged = merge_ranges(per_agent)
    central = measure_activation_ranges(float_model, images)
    assert merged is not None
    assert merged.tensors == central.tensors
    assert merged.samples == central.samples == 240

    from_agents = quantize_int8(float_model, agent_ranges=merged)
    from_centre = quantize_int8(float_model, central=images)
    assert (from_agents.calibration, from_centre.calibration) == ("agents", "central")
    assert from_agents.quantization == "int8_static"
    float_acc = tflite_accuracy(float_model, split.x_test, split.y_test)
    agents_acc = tflite_accuracy(from_agents.tflite, split.x_test, split.y_test)
    centre_acc = tflite_accuracy(from_centre.tflite, split.x_test, split.y_test)
    assert abs(agents_acc - centre_acc) <= 0.005
    assert agents_acc >= float_acc - 0.01
    # 0.35x: the weights alone are 0.255x; see test_where_the_int8_bytes_go.
    assert len(from_agents.tflite) < 0.36 * len(float_model)


def test_where_the_int8_bytes_go(trained: tuple[bytes, Any]) -> None:
    float_model, split = trained
    int8 = quantize_int8(float_model, central=split.x_train[:64]).tflite
    f32, q8 = flatbuffer_breakdown(float_model), flatbuffer_breakdown(int8)
    for parts in (f32, q8):
        assert sum(v for k, v in parts.items() if k != "total") == parts["total"]
    # int8 weights, int32 biases (and the reshape's 8-byte shape): 0.255x the float32 ones.
    assert (f32["weights"], q8["weights"]) == (34_856 + 8, 8_656 + 58 * 4 + 8)
    assert f32["quantization"] == 0
    # A scale (float32) and a zero point (int64) per channel of the 3 kernels and 3 biases
    # (2 * 58) and one per activation tensor (7): 12 bytes each.
    assert q8["quantization"] == (2 * 58 + 7) * 12


def test_without_ranges_or_central_set_int8_is_dynamic_range(trained: tuple[bytes, Any]) -> None:
    float_model, split = trained
    variant = quantize_int8(float_model)
    assert (variant.quantization, variant.calibration) == ("int8_dynamic", "dynamic")
    acc = tflite_accuracy(variant.tflite, split.x_test, split.y_test)
    assert acc >= tflite_accuracy(float_model, split.x_test, split.y_test) - 0.01


def test_ranges_of_another_model_fall_back_to_the_central_set(trained: tuple[bytes, Any]) -> None:
    float_model, split = trained
    foreign = ActivationRanges(
        model_sha256="0" * 64, samples=5, tensors={"not_a_tensor": TensorRange(min=0, max=1)}
    )
    variant = quantize_int8(float_model, agent_ranges=foreign, central=split.x_train[:64])
    assert variant.calibration == "central"


def test_ranges_of_the_initial_model_carry_over_to_a_trained_one(
    trained: tuple[bytes, Any], untrained: bytes
) -> None:
    float_model, split = trained
    ranges = measure_activation_ranges(untrained, split.x_train[:32])
    carried = carried_over(ranges, untrained, float_model)
    assert carried is not None
    assert len(carried.tensors) == len(ranges.tensors) == 7
    variant = quantize_int8(float_model, agent_ranges=carried)
    assert (variant.quantization, variant.calibration) == ("int8_static", "agents")


def test_release_variants_carry_size_and_accuracy(trained: tuple[bytes, Any]) -> None:
    float_model, split = trained
    variants = serving_variants(
        float_model, agent_ranges=None, eval_x=split.x_test, eval_y=split.y_test, central=True
    )
    assert [fields["name"] for fields, _ in variants] == ["float32", "int8"]
    (f32, _), (int8, data) = variants
    assert int8["calibration"] == "central"
    assert int8["evaluated_on"] == len(split.y_test)
    assert abs(int8["accuracy"] - f32["accuracy"]) <= 0.01
    assert len(data) < len(float_model)


def test_a_range_with_min_above_max_is_refused() -> None:
    with pytest.raises(ValidationError, match="above its maximum"):
        TensorRange(min=2.0, max=1.0)
    with pytest.raises(ValidationError):
        TensorRange(min=float("nan"), max=1.0)
