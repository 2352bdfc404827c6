"""Decoding image bytes, on real photos and hostile bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.preprocess import MAX_DECODE_PIXELS, decode_image
from protocol.errors import PreprocessError
from tests.agent.photos import _encode, _photo

# -- decode_image -------------------------------------------------------------------------


def test_decodes_jpeg_close_to_the_photo(astronaut: np.ndarray) -> None:
    decoded = decode_image(_encode(astronaut, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95)))
    assert decoded.shape == astronaut.shape
    assert decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - astronaut.astype(int)).mean() < 3.0


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_decodes_lossless_formats_exactly(coffee: np.ndarray, ext: str) -> None:
    params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()  # 101: lossless
    assert np.array_equal(decode_image(_encode(coffee, ext, params)), coffee)


def test_png_alpha_is_dropped_keeping_the_colour(coffee: np.ndarray) -> None:
    alpha = np.tile(np.linspace(0, 255, coffee.shape[1]).astype(np.uint8), (coffee.shape[0], 1))
    bgra = np.dstack([coffee, alpha])
    assert np.array_equal(decode_image(_encode(bgra, ".png")), coffee)


def test_grayscale_png_becomes_three_equal_channels() -> None:
    camera = _photo("camera")
    decoded = decode_image(_encode(camera, ".png"))
    assert decoded.shape == (*camera.shape, 3)
    for channel in range(3):
        assert np.array_equal(decoded[:, :, channel], camera)


def test_16_bit_png_is_scaled_to_8_bits(coffee: np.ndarray) -> None:
    assert np.array_equal(decode_image(_encode(coffee.astype(np.uint16) * 257, ".png")), coffee)
    deep = (coffee.astype(np.uint16) << 8) | 0x7F  # low byte carries sub-8-bit detail
    decoded = decode_image(_encode(deep, ".png"))
    assert np.abs(decoded.astype(int) - coffee.astype(int)).max() <= 1


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(PreprocessError) as info:
        decode_image(b"")
    assert info.value.reason == "empty"


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: data[:100], id="truncated-to-header"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated-half"),
        pytest.param(
            lambda data: data[:2] + bytes(b ^ 0xFF for b in data[2:40]) + data[40:],
            id="header-bytes-flipped",
        ),
        pytest.param(lambda data: b"\x00" + data[1:], id="no-start-marker"),
    ],
)
def test_corrupt_jpeg_is_undecodable(
    astronaut: np.ndarray, corrupt: Callable[[bytes], bytes]
) -> None:
    with pytest.raises(PreprocessError) as info:
        decode_image(corrupt(_encode(astronaut, ".jpg")))
    assert info.value.reason == "undecodable"


def test_text_is_undecodable() -> None:
    with pytest.raises(PreprocessError) as info:
        decode_image(b"this is not an image at all")
    assert info.value.reason == "undecodable"


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".tiff"])
def test_pixel_limit_is_enforced(coffee: np.ndarray, ext: str) -> None:
    data = _encode(coffee, ext)
    pixels = coffee.shape[0] * coffee.shape[1]
    assert decode_image(data, max_pixels=pixels).shape == coffee.shape
    with pytest.raises(PreprocessError) as info:
        decode_image(data, max_pixels=pixels - 1)
    assert info.value.reason == "too_large"


def test_old_style_bmp_header_is_read_with_its_16_bit_sides() -> None:
    width, height = 3, 2
    row = bytes([0, 0, 255, 0, 255, 0, 255, 0, 0]) + b"\0" * 3  # rows pad to 4 bytes
    pixels = row * height
    data = (
        b"BM"
        + struct.pack("<IHHI", 26 + len(pixels), 0, 0, 26)
        + struct.pack("<IHHHH", 12, width, height, 1, 24)
        + pixels
    )
    assert decode_image(data, max_pixels=width * height).shape == (height, width, 3)


def _claim_png(data: bytes) -> bytes:
    return data[:16] + struct.pack(">II", 60_000, 60_000) + data[24:]


def _claim_jpeg(data: bytes) -> bytes:
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", 60_000, 60_000) + data[sof + 9 :]


def _claim_bmp(data: bytes) -> bytes:
    return data[:18] + struct.pack("<ii", 60_000, 60_000) + data[26:]


def _claim_webp(data: bytes) -> bytes:
    assert data[12:16] == b"VP8L"
    bits = 0x3FFF | (0x3FFF << 14)  # 16384 x 16384
    return data[:21] + bits.to_bytes(4, "little") + data[25:]


@pytest.mark.parametrize(
    ("ext", "claim"),
    [(".png", _claim_png), (".jpg", _claim_jpeg), (".bmp", _claim_bmp), (".webp", _claim_webp)],
)
def test_huge_header_is_refused_before_decoding(
    coffee: np.ndarray, ext: str, claim: Callable[[bytes], bytes]
) -> None:
    # The patched header no longer matches the data (the PNG CRC fails, the JPEG scan is
    # short), so only a check that runs before decoding can answer "too_large".
    params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()
    with pytest.raises(PreprocessError) as info:
        decode_image(claim(_encode(coffee, ext, params)))
    assert info.value.reason == "too_large"
    assert MAX_DECODE_PIXELS < 16384 * 16384


_SMALL_REAL = cv2.resize(_photo("coffee"), (24, 16), interpolation=cv2.INTER_AREA)
_REAL_ENCODINGS = [_encode(_SMALL_REAL, ext) for ext in (".png", ".jpg", ".bmp", ".webp")]
_MAGIC = [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff",
    b"BM",
    b"RIFF\0\0\0\0WEBPVP8",
    b"",
]


@st.composite
def _hostile_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.sampled_from(_MAGIC)) + draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(_REAL_ENCODINGS)))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=500, deadline=None)
@given(data=_hostile_bytes())
def test_hostile_bytes_raise_only_preprocess_error(data: bytes) -> None:
    error: PreprocessError | None = None
    try:
        image = decode_image(data, max_pixels=1 << 20)
    except PreprocessError as exc:
        error = exc
    if error is not None:
        assert error.reason in {"empty", "undecodable", "too_large", "unsupported"}
        return
    assert image.dtype == np.uint8
    assert image.ndim == 3
    assert image.shape[2] == 3
