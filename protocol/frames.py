"""Frame payloads: a bare encoded image, or an envelope carrying metadata around one.

Three payload shapes, told apart by their first bytes only, so one is never taken for
another:

- a bare image, exactly what ``mosquitto_pub -f photo.jpg`` sends: JPEG (``FF D8 FF``),
  PNG (``89 'PNG' 0D 0A 1A 0A``), BMP (``'BM'``) or WebP (``'RIFF' .... 'WEBP'``);
- a binary envelope: ``'FDGF'``, a format version byte, a big-endian u32 header length,
  that many bytes of JSON :class:`FrameMeta`, then the image bytes;
- a JSON envelope (text starting with ``{``) for clients that only speak JSON:
  the :class:`FrameMeta` fields plus ``image_b64``.

Anything else is refused with :class:`FrameError`.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from protocol.errors import FrameError
from protocol.messages.base import Message, NonNegativeFloat

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "Frame",
    "FrameMeta",
    "PayloadShape",
    "decode_frame",
    "encode_envelope",
    "encode_json_envelope",
    "payload_shape",
]

DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_FRAME_HEADER_BYTES = 16 * 1024
ENVELOPE_MAGIC = b"FDGF"
ENVELOPE_VERSION = 1
_ENVELOPE_PREFIX = struct.Struct(">4sBI")

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_BMP = b"BM"


class PayloadShape(StrEnum):
    JPEG = "jpeg"
    PNG = "png"
    BMP = "bmp"
    WEBP = "webp"
    ENVELOPE = "envelope"
    JSON_ENVELOPE = "json_envelope"

    @property
    def is_bare_image(self) -> bool:
        return self not in {PayloadShape.ENVELOPE, PayloadShape.JSON_ENVELOPE}


FrameId = Annotated[str, Field(min_length=1, max_length=128)]
Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class FrameMeta(Message):
    """What a camera may say about a frame. Every field is optional."""

    kind: Literal["frame"] = "frame"
    frame_id: FrameId | None = None
    # Capture time, seconds since the epoch on the camera's clock.
    timestamp: NonNegativeFloat | None = None
    label: Label | None = None


class _JsonEnvelope(FrameMeta):
    image_b64: str


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame payload: the encoded image bytes and whatever metadata came with it."""

    image: bytes
    meta: FrameMeta
    shape: PayloadShape


def payload_shape(payload: bytes) -> PayloadShape:
    """Tell what a frame payload is from its first bytes, or raise :class:`FrameError`."""
    if not payload:
        raise FrameError("empty frame payload", reason="empty")
    if payload.startswith(ENVELOPE_MAGIC):
        return PayloadShape.ENVELOPE
    if payload.startswith(_JPEG):
        return PayloadShape.JPEG
    if payload.startswith(_PNG):
        return PayloadShape.PNG
    if payload.startswith(_BMP):
        return PayloadShape.BMP
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return PayloadShape.WEBP
    if payload[:64].lstrip()[:1] == b"{":
        return PayloadShape.JSON_ENVELOPE
    raise FrameError(
        "payload is neither a JPEG/PNG/BMP/WebP image nor a fedge frame envelope",
        reason="unknown_format",
    )


def decode_frame(payload: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Split a frame payload into image bytes and metadata. Never decodes the image."""
    if len(payload) > max_bytes:
        raise FrameError(
            f"frame payload of {len(payload)} bytes exceeds the limit of {max_bytes}",
            reason="too_large",
        )
    shape = payload_shape(payload)
    if shape is PayloadShape.ENVELOPE:
        return _decode_binary_envelope(payload)
    if shape is PayloadShape.JSON_ENVELOPE:
        return _decode_json_envelope(payload)
    return Frame(image=payload, meta=FrameMeta(), shape=shape)


def encode_envelope(image: bytes, meta: FrameMeta) -> bytes:
    """The binary envelope: compact, and the image bytes are not re-encoded."""
    header = meta.model_dump_json(exclude_none=True).encode("utf-8")
    return _ENVELOPE_PREFIX.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, len(header)) + header + image


def encode_json_envelope(image: bytes, meta: FrameMeta) -> bytes:
    fields = meta.model_dump(exclude_none=True)
    envelope = _JsonEnvelope(**fields, image_b64=base64.b64encode(image).decode("ascii"))
    return envelope.model_dump_json(exclude_none=True).encode("utf-8")


def _decode_binary_envelope(payload: bytes) -> Frame:
    if len(payload) < _ENVELOPE_PREFIX.size:
        raise FrameError("frame envelope shorter than its header", reason="bad_envelope")
    _, version, header_bytes = _ENVELOPE_PREFIX.unpack_from(payload)
    if version != ENVELOPE_VERSION:
        raise FrameError(f"frame envelope version {version} is not supported", reason="version")
    if header_bytes > MAX_FRAME_HEADER_BYTES:
        raise FrameError("frame envelope header too large", reason="bad_envelope")
    start = _ENVELOPE_PREFIX.size
    header, image = payload[start : start + header_bytes], payload[start + header_bytes :]
    if len(header) != header_bytes:
        raise FrameError("frame envelope truncated inside its header", reason="bad_envelope")
    try:
        meta = FrameMeta.model_validate_json(header)
    except ValidationError as exc:
        raise FrameError(
            f"frame envelope header invalid: {_first_error(exc)}", reason="bad_envelope"
        ) from exc
    return Frame(image=_checked_image(image), meta=meta, shape=PayloadShape.ENVELOPE)


def _decode_json_envelope(payload: bytes) -> Frame:
    try:
        envelope = _JsonEnvelope.model_validate_json(payload)
    except ValidationError as exc:
        raise FrameError(
            f"JSON frame envelope invalid: {_first_error(exc)}", reason="bad_envelope"
        ) from exc
    try:
        image = base64.b64decode(envelope.image_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FrameError("image_b64 is not valid base64", reason="bad_envelope") from exc
    meta = FrameMeta.model_validate(envelope.model_dump(exclude={"image_b64"}))
    return Frame(image=_checked_image(image), meta=meta, shape=PayloadShape.JSON_ENVELOPE)


def _checked_image(image: bytes) -> bytes:
    if not image:
        raise FrameError("frame envelope carries no image", reason="empty")
    shape = payload_shape(image)
    if not shape.is_bare_image:
        raise FrameError("frame envelope must carry an encoded image", reason="bad_envelope")
    return image


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_input=False)
    if not errors:
        return "invalid"
    first = errors[0]
    location = ".".join(str(part) for part in first["loc"]) or "envelope"
    return f"{location}: {first['msg']}"
