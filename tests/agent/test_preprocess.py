"""Preparing model inputs from decoded images, on real photos and digits."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.datasets import load_digits

from agent.preprocess import decode_image, prepare_input, quantize
from protocol.errors import PreprocessError
from protocol.preprocess import ColorOrder, Normalization, PreprocessSpec, ResizeMode
from tests.agent.photos import _encode

# -- prepare_input ------------------------------------------------------------------------


def _spec(**overrides: object) -> PreprocessSpec:
    fields: dict[str, object] = {"height": 4, "width": 4, "normalization": Normalization.NONE}
    fields.update(overrides)
    return PreprocessSpec.model_validate(fields)


def test_red_lands_in_channel_0_for_rgb_and_channel_2_for_bgr() -> None:
    red_bgr = np.zeros((4, 4, 3), dtype=np.uint8)
    red_bgr[:, :, 2] = 255
    rgb = prepare_input(red_bgr, _spec(color=ColorOrder.RGB, normalization=Normalization.SCALE))
    bgr = prepare_input(red_bgr, _spec(color=ColorOrder.BGR, normalization=Normalization.SCALE))
    assert np.array_equal(rgb[0, 0], np.array([1.0, 0.0, 0.0], dtype=np.float32))
    assert np.array_equal(bgr[0, 0], np.array([0.0, 0.0, 1.0], dtype=np.float32))


def test_gray_output_keeps_a_channel_axis(astronaut: np.ndarray) -> None:
    out = prepare_input(astronaut, _spec(height=28, width=20, color=ColorOrder.GRAY))
    assert out.shape == (28, 20, 1)
    assert out.dtype == np.float32


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1)])
def test_gray_input_is_accepted_for_every_color_order(shape: tuple[int, ...]) -> None:
    image = np.arange(30, dtype=np.uint8).reshape(shape)
    for color in ColorOrder:
        out = prepare_input(image, _spec(height=6, width=5, color=color))
        assert out.shape == (6, 5, 1 if color is ColorOrder.GRAY else 3)
        assert np.array_equal(out[:, :, 0], image.reshape(6, 5).astype(np.float32))


def test_stretch_uses_area_when_shrinking_and_linear_when_enlarging(coffee: np.ndarray) -> None:
    spec_small = _spec(height=40, width=60, color=ColorOrder.BGR)
    expected_small = cv2.resize(coffee, (60, 40), interpolation=cv2.INTER_AREA)
    assert np.array_equal(prepare_input(coffee, spec_small), expected_small.astype(np.float32))
    patch = coffee[:10, :10]
    spec_big = _spec(height=30, width=25, color=ColorOrder.BGR)
    expected_big = cv2.resize(patch, (25, 30), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(prepare_input(patch, spec_big), expected_big.astype(np.float32))


def test_letterbox_wide_image_is_centred_with_bands_above_and_below() -> None:
    wide = np.full((50, 100, 3), 200, dtype=np.uint8)  # 2:1 into a square
    spec = _spec(height=64, width=64, resize=ResizeMode.LETTERBOX, pad_value=7)
    out = prepare_input(wide, spec)
    assert out.shape == (64, 64, 3)
    assert np.all(out[:16] == 7.0)
    assert np.all(out[16:48] == 200.0)
    assert np.all(out[48:] == 7.0)


def test_letterbox_tall_image_pads_left_and_right_with_odd_split() -> None:
    tall = np.full((60, 20), 90, dtype=np.uint8)  # 20x60 into 25x30: inner 10x30
    spec = _spec(
        height=30, width=25, resize=ResizeMode.LETTERBOX, pad_value=255, color=ColorOrder.GRAY
    )
    out = prepare_input(tall, spec)[:, :, 0]
    assert np.all(out[:, :7] == 255.0)  # floor of 15 / 2 on the left
    assert np.all(out[:, 7:17] == 90.0)
    assert np.all(out[:, 17:] == 255.0)


def test_letterbox_of_matching_aspect_has_no_border(coffee: np.ndarray) -> None:
    spec = _spec(
        height=40, width=60, resize=ResizeMode.LETTERBOX, pad_value=1, color=ColorOrder.BGR
    )
    stretched = prepare_input(coffee, spec.model_copy(update={"resize": ResizeMode.STRETCH}))
    assert np.array_equal(prepare_input(coffee, spec), stretched)


def test_pad_value_is_not_inverted() -> None:
    wide = np.zeros((2, 4), dtype=np.uint8)
    spec = _spec(
        height=4,
        width=4,
        resize=ResizeMode.LETTERBOX,
        pad_value=30,
        invert=True,
        color=ColorOrder.GRAY,
    )
    out = prepare_input(wide, spec)[:, :, 0]
    assert out[:, 0].tolist() == [30.0, 255.0, 255.0, 30.0]


_SMALL = np.array([[[0, 10, 20], [255, 128, 64]]], dtype=np.uint8)  # 1x2 BGR


def test_normalization_none_gives_raw_values() -> None:
    out = prepare_input(_SMALL, _spec(height=1, width=2, color=ColorOrder.BGR))
    assert np.array_equal(out, _SMALL.astype(np.float32))


def test_normalization_scale_applies_scale_and_offset() -> None:
    spec = _spec(
        height=1,
        width=2,
        color=ColorOrder.BGR,
        normalization=Normalization.SCALE,
        scale=2.0,
        offset=-1.0,
    )
    assert prepare_input(_SMALL, spec).tolist() == [[[-1.0, 19.0, 39.0], [509.0, 255.0, 127.0]]]


def test_normalization_zscore_is_per_channel_in_rgb_order() -> None:
    spec = _spec(
        height=1,
        width=2,
        normalization=Normalization.ZSCORE,
        mean=(0.0, 0.5, 1.0),
        std=(1.0, 0.5, 0.25),
    )
    out = prepare_input(_SMALL, spec)
    rgb = _SMALL[:, :, ::-1].astype(np.float32) / np.float32(255.0)
    expected = (rgb - np.array([0.0, 0.5, 1.0], np.float32)) / np.array([1, 0.5, 0.25], np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out[0, 1].tolist() == pytest.approx([64 / 255, 2 * (128 / 255 - 0.5), 0.0], abs=1e-6)


def test_normalization_minmax_spans_zero_to_one_and_zeros_a_constant_image() -> None:
    gray = np.array([[10, 20], [30, 50]], dtype=np.uint8)
    spec = _spec(height=2, width=2, color=ColorOrder.GRAY, normalization=Normalization.MINMAX)
    assert prepare_input(gray, spec)[:, :, 0].tolist() == [[0.0, 0.25], [0.5, 1.0]]
    constant = np.full((2, 2), 77, dtype=np.uint8)
    assert np.array_equal(prepare_input(constant, spec), np.zeros((2, 2, 1), np.float32))


def test_invert_flips_light_and_dark() -> None:
    gray = np.array([[0, 255], [1, 100]], dtype=np.uint8)
    spec = _spec(height=2, width=2, color=ColorOrder.GRAY, invert=True)
    assert prepare_input(gray, spec)[:, :, 0].tolist() == [[255.0, 0.0], [254.0, 155.0]]


def test_digit_survives_upscale_png_decode_and_prepare() -> None:
    digits = load_digits()
    spec = PreprocessSpec(
        height=8,
        width=8,
        color=ColorOrder.GRAY,
        resize=ResizeMode.STRETCH,
        normalization=Normalization.SCALE,
        scale=1.0 / 255.0,
    )
    for index in (0, 1, 7, 42, 1000):
        digit = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        big = cv2.resize(digit, (64, 64), interpolation=cv2.INTER_NEAREST)
        out = prepare_input(decode_image(_encode(big, ".png")), spec)
        assert out.shape == (8, 8, 1)
        np.testing.assert_allclose(out[:, :, 0], digit / 255.0, atol=1.0 / 255.0)


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "bad_image"),
        (np.zeros((4, 4, 4), dtype=np.uint8), "bad_image"),
        (np.zeros((4,), dtype=np.uint8), "bad_image"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
    ],
)
def test_unusable_arrays_are_refused(image: np.ndarray, reason: str) -> None:
    with pytest.raises(PreprocessError) as info:
        prepare_input(image, _spec())
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "overrides",
    [
        {"normalization": Normalization.SCALE, "scale": 1e300},
        {
            "normalization": Normalization.ZSCORE,
            "color": ColorOrder.GRAY,
            "mean": (0.0,),
            "std": (1e-300,),
        },
    ],
)
def test_specs_that_would_overflow_float32_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(PreprocessError) as info:
        prepare_input(np.zeros((4, 4, 3), dtype=np.uint8), _spec(**overrides))
    assert info.value.reason == "bad_spec"


_finite = st.floats(-1e3, 1e3, allow_nan=False)
_positive = st.floats(1e-3, 1e3, allow_nan=False)


@st.composite
def _specs(draw: st.DrawFn) -> PreprocessSpec:
    color = draw(st.sampled_from(ColorOrder))
    channels = 1 if color is ColorOrder.GRAY else 3
    return PreprocessSpec(
        height=draw(st.integers(1, 24)),
        width=draw(st.integers(1, 24)),
        color=color,
        resize=draw(st.sampled_from(ResizeMode)),
        pad_value=draw(st.integers(0, 255)),
        invert=draw(st.booleans()),
        normalization=draw(st.sampled_from(Normalization)),
        scale=draw(_finite),
        offset=draw(_finite),
        mean=tuple(draw(st.lists(_finite, min_size=channels, max_size=channels))),
        std=tuple(draw(st.lists(_positive, min_size=channels, max_size=channels))),
    )


_images = st.sampled_from([(), (1,), (3,)]).flatmap(
    lambda tail: hnp.arrays(
        np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)).map(lambda hw: hw + tail)
    )
)


@settings(max_examples=300, deadline=None)
@given(image=_images, spec=_specs())
def test_prepare_input_gives_the_spec_shape_and_finite_float32(
    image: np.ndarray, spec: PreprocessSpec
) -> None:
    out = prepare_input(image, spec)
    assert out.shape == (spec.height, spec.width, spec.channels)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


# -- quantize -----------------------------------------------------------------------------


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0])
    q = quantize(x, scale=1.0, zero_point=0, dtype=np.int8)
    assert q.dtype == np.int8
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]


def test_quantize_uses_scale_and_zero_point() -> None:
    x = np.array([0.0, 1.0, -1.0, 0.004], dtype=np.float32)
    q = quantize(x, scale=1.0 / 128.0, zero_point=128, dtype=np.uint8)
    assert q.tolist() == [128, 255, 0, 129]


@pytest.mark.parametrize(
    ("scale", "dtype", "values"),
    [
        (0.0, np.int8, [1.0]),
        (float("nan"), np.int8, [1.0]),
        (1.0, np.float32, [1.0]),
        (1.0, np.int8, [float("nan")]),
    ],
)
def test_quantize_refuses_impossible_parameters(
    scale: float, dtype: type[np.generic], values: list[float]
) -> None:
    with pytest.raises(PreprocessError) as info:
        quantize(np.array(values), scale=scale, zero_point=0, dtype=dtype)
    assert info.value.reason == "bad_quantization"
