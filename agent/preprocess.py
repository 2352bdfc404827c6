"""From encoded image bytes to the model's input array: decode, then prepare per spec.

Pure functions, ndarray in and ndarray out; the only foreign errors are OpenCV's, and
they become :class:`~protocol.errors.PreprocessError` here. Reasons carried by the
errors raised in this module:

``empty``
    no bytes, or an image without pixels
``undecodable``
    bytes OpenCV cannot decode
``too_large``
    more pixels than allowed (checked from the header before decoding for PNG, JPEG,
    BMP and WebP, and again after decoding for every format)
``unsupported``
    a decoded pixel layout fedge does not handle (signed samples, five channels, ...)
``bad_image``
    an array handed to :func:`prepare_input` that is not a uint8 image
``bad_spec``
    a spec whose normalised values could exceed 1e30 in magnitude
``bad_quantization``
    quantisation parameters that cannot work
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from protocol.errors import PreprocessError
from protocol.preprocess import ColorOrder, Normalization, PreprocessSpec, ResizeMode

__all__ = [
    "MAX_DECODE_PIXELS",
    "InputGeometry",
    "decode_image",
    "input_geometry",
    "prepare_input",
    "quantize",
]

# 8K UHD; a camera frame is far smaller, and the BGR copy of this is already ~100 MB.
MAX_DECODE_PIXELS = 7680 * 4320

# Normalised values stay well inside float32 (max ~3.4e38), so rounding never overflows.
_MAX_NORMALIZED_ABS = 1e30
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (C4, C8 and CC share the range but are not frames).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JPEG markers that stand alone, without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def decode_image(data: bytes, *, max_pixels: int = MAX_DECODE_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/BMP/WebP/... bytes into a uint8 BGR array of shape (H, W, 3).

    Greyscale becomes three equal channels; an alpha channel is dropped (the colour
    underneath is kept as is, not composited); 16-bit samples are scaled to 8 bits and
    float samples in 0..1 to 0..255. EXIF orientation is not applied: frames are used
    the way the camera sent them.
    """
    if not data:
        raise PreprocessError("no image bytes", reason="empty")
    size = _header_size(data)
    if size is not None:
        _check_pixels(size[0], size[1], max_pixels)
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise PreprocessError(
            f"OpenCV cannot decode the image: {exc}", reason="undecodable"
        ) from exc
    if decoded is None:
        raise PreprocessError(
            f"{len(data)} bytes are not an image OpenCV can decode", reason="undecodable"
        )
    if decoded.size == 0:
        raise PreprocessError("the image has no pixels", reason="empty")
    _check_pixels(decoded.shape[1], decoded.shape[0], max_pixels)
    return _to_bgr(_to_uint8(decoded))


def prepare_input(image_bgr: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Turn a uint8 image into the float32 array of shape (height, width, channels).

    ``image_bgr`` is (H, W, 3) in BGR order, or greyscale as (H, W) or (H, W, 1). The
    steps run in this order: colour (to grey first, so the resize moves a third of the
    data), invert, resize (``pad_value`` is the raw value the model sees in the
    letterbox border, after inversion), channel order, normalisation. Quantisation
    is left to the runtime, which knows the model's tensor parameters (see
    :func:`quantize`).
    """
    _check_spec_range(spec)
    image = _as_uint8_image(image_bgr)
    if spec.color is ColorOrder.GRAY:
        image = _to_gray(image)
    if spec.invert:
        image = 255 - image
    if spec.resize is ResizeMode.LETTERBOX:
        image = _letterbox(image, spec.width, spec.height, spec.pad_value)
    else:
        image = _resize(image, spec.width, spec.height)
    if spec.color is not ColorOrder.GRAY:
        image = _to_color(image, rgb=spec.color is ColorOrder.RGB)
    return _normalize(image, spec)


@dataclass(frozen=True, slots=True)
class InputGeometry:
    """Where a frame lands in the model input: ``input = frame * scale + offset`` per axis.

    Coordinates are continuous (0 is the left edge of the first pixel, ``width`` the right
    edge of the last), which is how ``cv2.resize`` maps one image onto another.
    """

    frame_width: int
    frame_height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_frame(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model-input coordinates back to the frame's, clipped to the frame."""
        frame_x = np.clip((x - self.offset_x) / self.scale_x, 0.0, self.frame_width)
        frame_y = np.clip((y - self.offset_y) / self.scale_y, 0.0, self.frame_height)
        return frame_x, frame_y


def input_geometry(frame_width: int, frame_height: int, spec: PreprocessSpec) -> InputGeometry:
    """How :func:`prepare_input` places a ``frame_width`` x ``frame_height`` frame."""
    if spec.resize is ResizeMode.LETTERBOX:
        inner_width, inner_height, left, top = _letterbox_layout(
            frame_width, frame_height, spec.width, spec.height
        )
        return InputGeometry(
            frame_width,
            frame_height,
            inner_width / frame_width,
            inner_height / frame_height,
            float(left),
            float(top),
        )
    return InputGeometry(
        frame_width, frame_height, spec.width / frame_width, spec.height / frame_height, 0.0, 0.0
    )


def quantize(x: np.ndarray, *, scale: float, zero_point: int, dtype: npt.DTypeLike) -> np.ndarray:
    """Quantise real values: ``round(x / scale) + zero_point``, clipped to ``dtype``.

    Rounds half to even, as TFLite does; values beyond the dtype's range saturate.
    """
    target = np.dtype(dtype)
    if target.kind not in "iu":
        raise PreprocessError(f"cannot quantise to {target}", reason="bad_quantization")
    if not (math.isfinite(scale) and scale > 0.0):
        raise PreprocessError(
            f"quantisation scale must be finite and > 0, got {scale}", reason="bad_quantization"
        )
    values = np.asarray(x, dtype=np.float64)
    if np.isnan(values).any():
        raise PreprocessError("cannot quantise NaN", reason="bad_quantization")
    info = np.iinfo(target)
    # Huge values divided by a tiny scale overflow to inf on purpose: the clip saturates them.
    with np.errstate(over="ignore"):
        q = np.rint(values / scale) + zero_point
    quantized: np.ndarray = np.clip(q, info.min, info.max).astype(target)
    return quantized


# -- decoding -----------------------------------------------------------------------------


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise PreprocessError(
            f"image of {width}x{height} pixels exceeds the limit of {max_pixels}",
            reason="too_large",
        )


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, BMP or WebP; None if unknown.

    Not Pillow's lazy ``Image.open(...).size``: it checks chunk CRCs and calls a PNG whose
    IHDR claims 60000x60000 unidentifiable, so a forged size would be reported as
    undecodable rather than too large, and agents would carry a second image library for
    four header fields. OpenCV's own cap (OPENCV_IO_MAX_IMAGE_PIXELS) is process-wide and
    read once, not the per-model limit this check enforces.
    """
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(b"BM") and len(data) >= 26:
        if data[14:18] == b"\x0c\x00\x00\x00":  # the old 12-byte header: 16-bit sides
            width, height = struct.unpack("<HH", data[18:22])
        else:
            width, height = struct.unpack("<ii", data[18:26])
        return abs(int(width)), abs(int(height))
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            # A height of 0 is defined later by a DNL marker; leave it to the decoder.
            return (int(width), int(height)) if height else None
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return int(width) & 0x3FFF, int(height) & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # 257 maps 65535 to 255 exactly and every 8-bit value stored as v * 257 back to v.
        return cv2.convertScaleAbs(image, alpha=1.0 / 257.0)
    if image.dtype.kind == "f":
        unit = np.clip(np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        scaled: np.ndarray = np.rint(unit * 255.0).astype(np.uint8)
        return scaled
    raise PreprocessError(f"unsupported sample type {image.dtype}", reason="unsupported")


def _to_bgr(image: np.ndarray) -> np.ndarray:
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels in (1, 2):  # grey, or grey with alpha
        gray = image if image.ndim == 2 else np.ascontiguousarray(image[:, :, 0])
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if channels == 3:
        return image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise PreprocessError(f"unsupported channel count {channels}", reason="unsupported")


# -- preparing ----------------------------------------------------------------------------


def _check_spec_range(spec: PreprocessSpec) -> None:
    """Refuse specs whose outputs would overflow float32 rather than hand out infinities."""
    if spec.normalization is Normalization.SCALE:
        bound = 255.0 * abs(spec.scale) + abs(spec.offset)
    elif spec.normalization is Normalization.ZSCORE:
        bound = max((1.0 + abs(mean)) / std for mean, std in zip(spec.mean, spec.std, strict=True))
    else:
        return
    if not bound <= _MAX_NORMALIZED_ABS:
        raise PreprocessError(
            f"{spec.normalization} parameters give values beyond {_MAX_NORMALIZED_ABS:g}",
            reason="bad_spec",
        )


def _as_uint8_image(image: np.ndarray) -> np.ndarray:
    """The image as (H, W) for grey or (H, W, 3) for colour, after checking it."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise PreprocessError(f"expected a uint8 image, got {kind}", reason="bad_image")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise PreprocessError(
            f"expected HxW, HxWx1 or HxWx3, got {image.shape}", reason="bad_image"
        )
    if image.size == 0:
        raise PreprocessError("the image has no pixels", reason="empty")
    return np.ascontiguousarray(image)


def _to_gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _to_color(image: np.ndarray, *, rgb: bool) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)  # equal channels: order is moot
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if rgb else image


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    src_height, src_width = image.shape[:2]
    if (src_width, src_height) == (width, height):
        return image
    # Area averaging avoids aliasing when shrinking; it only blurs blocks when enlarging.
    shrinking = width <= src_width and height <= src_height
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _letterbox_layout(
    src_width: int, src_height: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """(inner width, inner height, left, top) of the resized image inside the canvas."""
    ratio = min(width / src_width, height / src_height)
    inner_width = min(width, max(1, round(src_width * ratio)))
    inner_height = min(height, max(1, round(src_height * ratio)))
    return inner_width, inner_height, (width - inner_width) // 2, (height - inner_height) // 2


def _letterbox(image: np.ndarray, width: int, height: int, pad_value: int) -> np.ndarray:
    src_height, src_width = image.shape[:2]
    inner_width, inner_height, left, top = _letterbox_layout(src_width, src_height, width, height)
    inner = _resize(image, inner_width, inner_height)
    canvas = np.full((height, width, *image.shape[2:]), pad_value, dtype=np.uint8)
    canvas[top : top + inner_height, left : left + inner_width] = inner
    return canvas


def _normalize(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    x = image.astype(np.float32)
    if x.ndim == 2:
        x = x[:, :, np.newaxis]
    if spec.normalization is Normalization.SCALE:
        x = x * np.float32(spec.scale) + np.float32(spec.offset)
    elif spec.normalization is Normalization.ZSCORE:
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        x = (x / np.float32(255.0) - mean) / std
    elif spec.normalization is Normalization.MINMAX:
        low, high = float(x.min()), float(x.max())
        x = (x - low) / np.float32(high - low) if high > low else np.zeros_like(x)
    return np.ascontiguousarray(x, dtype=np.float32)
