from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FedgeError, FrameError
from protocol.frames import (
    Frame,
    FrameMeta,
    PayloadShape,
    decode_frame,
    encode_envelope,
    encode_json_envelope,
    payload_shape,
)

JPEG = b"\xff\xd8\xff\xe0" + b"jpeg-body"
PNG = b"\x89PNG\r\n\x1a\n" + b"png-body"
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 "


@pytest.mark.parametrize(
    ("payload", "shape"),
    [
        (JPEG, PayloadShape.JPEG),
        (PNG, PayloadShape.PNG),
        (b"BM" + b"\0" * 20, PayloadShape.BMP),
        (WEBP, PayloadShape.WEBP),
    ],
)
def test_bare_images_pass_through_untouched(payload: bytes, shape: PayloadShape) -> None:
    frame = decode_frame(payload)
    assert frame == Frame(image=payload, meta=FrameMeta(), shape=shape)


@pytest.mark.parametrize("image", [JPEG, PNG])
@pytest.mark.parametrize("encode", [encode_envelope, encode_json_envelope])
def test_envelopes_round_trip(image: bytes, encode: object) -> None:
    meta = FrameMeta(frame_id="cam-1-000042", timestamp=1700000000.25, label="7")
    payload = encode(image, meta)  # type: ignore[operator]
    frame = decode_frame(payload)
    assert frame.image == image
    assert frame.meta == meta
    assert not frame.shape.is_bare_image


def test_shapes_are_never_confused() -> None:
    meta = FrameMeta(frame_id="x")
    assert payload_shape(encode_envelope(JPEG, meta)) is PayloadShape.ENVELOPE
    assert payload_shape(encode_json_envelope(JPEG, meta)) is PayloadShape.JSON_ENVELOPE
    assert payload_shape(JPEG) is PayloadShape.JPEG


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"GIF89a....", "unknown_format"),
        (b"FDGF\x01\x00\x00\x00\x05{}", "bad_envelope"),
        (b"FDGF\x02\x00\x00\x00\x02{}" + JPEG, "version"),
        (b"FDGF\x01\x00\x00\x00\x02{}", "empty"),
        (b"FDGF\x01\x00\x00\x00\x02{}" + b"not an image", "unknown_format"),
        (b'{"frame_id": "x"}', "bad_envelope"),
        (b'{"image_b64": "***"}', "bad_envelope"),
        (b'{"image_b64": "", "frame_id": "x"}', "empty"),
        (json.dumps({"image_b64": "aGk=", "label": "a/b"}).encode(), "bad_envelope"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as excinfo:
        decode_frame(payload)
    assert excinfo.value.reason == reason


def test_oversized_payload_is_refused() -> None:
    with pytest.raises(FrameError) as excinfo:
        decode_frame(JPEG + b"\0" * 100, max_bytes=50)
    assert excinfo.value.reason == "too_large"


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_fedge_errors(data: bytes) -> None:
    with contextlib.suppress(FedgeError):
        decode_frame(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=128))
def test_random_envelope_bodies_raise_only_fedge_errors(header: bytes, image: bytes) -> None:
    payload = b"FDGF\x01" + len(header).to_bytes(4, "big") + header + image
    with contextlib.suppress(FedgeError):
        decode_frame(payload)
