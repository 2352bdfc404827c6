"""The reference workload: digits split, non-IID partition, CNN, frames and exported files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from coordinator.reference import (
    DIGITS_LABELS,
    DigitsSplit,
    build_reference_cnn,
    digit_images_uint8,
    digit_png,
    digits_preprocess_spec,
    load_digits_split,
    non_iid_partition,
    upscale_digit,
)
from coordinator.tflite_export import ReferenceModels, export_int8_tflite
from protocol.errors import ModelError
from protocol.preprocess import ColorOrder, InputDType, Normalization, PreprocessSpec, ResizeMode

REFERENCE_PARAMS = 8_714


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


def test_split_has_the_reference_sizes_shapes_and_range(split: DigitsSplit) -> None:
    assert split.x_train.shape == (1347, 8, 8, 1)
    assert split.x_test.shape == (450, 8, 8, 1)
    assert split.x_train.dtype == np.float32
    assert split.y_train.shape == (1347,)
    assert split.y_test.shape == (450,)
    assert split.x_train.min() == 0.0
    assert split.x_train.max() == 1.0
    # pixels / 16: every value is a multiple of 1/16
    assert np.array_equal(split.x_test * 16, np.rint(split.x_test * 16))


def test_split_is_stratified_and_repeatable(split: DigitsSplit) -> None:
    train_counts = np.bincount(split.y_train, minlength=10)
    test_counts = np.bincount(split.y_test, minlength=10)
    total = train_counts + test_counts
    assert np.all(np.abs(test_counts - 0.25 * total) <= 1)
    again = load_digits_split()
    assert np.array_equal(again.x_train, split.x_train)
    assert np.array_equal(again.y_test, split.y_test)


@pytest.mark.parametrize("agents", [1, 10, 50])
def test_partition_gives_every_training_index_to_exactly_one_agent(
    split: DigitsSplit, agents: int
) -> None:
    parts = non_iid_partition(split.y_train, agents)
    assert len(parts) == agents
    merged = np.sort(np.concatenate(parts))
    assert np.array_equal(merged, np.arange(len(split.y_train)))


def test_partition_is_deterministic_and_pinned(split: DigitsSplit) -> None:
    first = non_iid_partition(split.y_train, 10)
    second = non_iid_partition(split.y_train, 10)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    # Pins the exact procedure (class order, permutation, Dirichlet draw, int cuts).
    assert [len(p) for p in first] == [145, 98, 61, 161, 122, 76, 213, 186, 103, 182]
    other_seed = non_iid_partition(split.y_train, 10, seed=7)
    assert [len(p) for p in other_seed] != [len(p) for p in first]


def test_partition_is_skewed_by_label_at_small_alpha(split: DigitsSplit) -> None:
    def worst_label_skew(alpha: float) -> float:
        overall = np.bincount(split.y_train, minlength=10) / len(split.y_train)
        skews = []
        for part in non_iid_partition(split.y_train, 10, alpha=alpha):
            local = np.bincount(split.y_train[part], minlength=10) / len(part)
            skews.append(0.5 * np.abs(local - overall).sum())
        return float(max(skews))

    assert worst_label_skew(0.5) > 0.3
    assert worst_label_skew(1000.0) < 0.1


def test_partition_rejects_impossible_arguments(split: DigitsSplit) -> None:
    with pytest.raises(ValueError, match="num_agents"):
        non_iid_partition(split.y_train, 0)
    with pytest.raises(ValueError, match="alpha"):
        non_iid_partition(split.y_train, 3, alpha=0.0)


def test_reference_cnn_has_the_reference_shape_and_seeded_weights() -> None:
    model = build_reference_cnn()
    assert model.count_params() == REFERENCE_PARAMS
    assert tuple(model.input_shape) == (None, 8, 8, 1)
    assert tuple(model.output_shape) == (None, 10)
    assert [w.shape for w in model.get_weights()] == [
        (3, 3, 1, 16),
        (16,),
        (256, 32),
        (32,),
        (32, 10),
        (10,),
    ]
    again = build_reference_cnn()
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_digit_images_round_trip_through_a_png_frame(split: DigitsSplit) -> None:
    images = digit_images_uint8(split.x_test[:20])
    assert images.shape == (20, 8, 8)
    assert images.dtype == np.uint8
    assert np.abs(images / 255.0 - split.x_test[:20, ..., 0]).max() <= 1 / 510 + 1e-7
    for image in images:
        frame = cv2.imdecode(np.frombuffer(digit_png(image), np.uint8), cv2.IMREAD_GRAYSCALE)
        assert frame is not None
        assert frame.shape == (64, 64)
        back = cv2.resize(frame, (8, 8), interpolation=cv2.INTER_AREA)
        assert np.array_equal(back, image)


def test_upscale_digit_repeats_pixels_and_refuses_other_sizes() -> None:
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    big = upscale_digit(image, side_px=16)
    assert big.shape == (16, 16)
    assert np.array_equal(big[::2, ::2], image)
    assert np.array_equal(big[1::2, 1::2], image)
    with pytest.raises(ValueError, match="multiple"):
        upscale_digit(image, side_px=20)
    with pytest.raises(ValueError, match="square"):
        upscale_digit(np.zeros((8, 9), np.uint8))


def test_digits_preprocess_spec_describes_the_agent_pipeline() -> None:
    spec = digits_preprocess_spec()
    assert (spec.height, spec.width, spec.channels) == (8, 8, 1)
    assert spec.color is ColorOrder.GRAY
    assert spec.resize is ResizeMode.STRETCH
    assert spec.normalization is Normalization.SCALE
    assert spec.scale == pytest.approx(1 / 255)
    assert spec.dtype is InputDType.FLOAT32
    assert digits_preprocess_spec(InputDType.INT8).dtype is InputDType.INT8
    assert PreprocessSpec.model_validate_json(spec.model_dump_json()) == spec


def test_written_reference_files_describe_the_digits_model(
    reference_models: ReferenceModels,
) -> None:
    labels = reference_models.labels.read_text(encoding="utf-8").splitlines()
    assert tuple(labels) == DIGITS_LABELS == tuple("0123456789")
    spec = PreprocessSpec.model_validate_json(reference_models.preprocess.read_text("utf-8"))
    assert spec == digits_preprocess_spec()
    for path in reference_models.all_paths():
        assert path.stat().st_size > 0


def test_trained_weights_reach_the_reference_accuracy(
    reference_models: ReferenceModels, split: DigitsSplit
) -> None:
    model = build_reference_cnn()
    model.set_weights(reference_models.load_digits_weights())
    assert sum(w.size for w in model.get_weights()) == REFERENCE_PARAMS
    probs = model.predict(split.x_test, verbose=0)
    assert np.mean(np.argmax(probs, axis=1) == split.y_test) >= 0.9


def test_int8_export_refuses_empty_representative_data() -> None:
    model = build_reference_cnn()
    with pytest.raises(ModelError, match="representative"):
        export_int8_tflite(model, np.zeros((0, 8, 8, 1), np.float32))
