"""The one error tree of fedge.

Every error fedge raises on purpose derives from :class:`FedgeError`; foreign errors
(paho, OpenCV, LiteRT, TensorFlow, safetensors, cryptography) are converted once, at the
boundary where they occur, with ``raise ... from exc``::

    FedgeError
    ├── ProtocolError            bytes or text from the network that fedge refuses
    │   ├── TopicError           a topic or id that is not one of fedge's
    │   ├── MessageError         JSON that is not a valid fedge message
    │   ├── FrameError           a frame payload that is neither an image nor an envelope
    │   ├── TensorCodecError     tensor bytes that do not decode
    │   ├── ChunkError           a chunk or manifest that does not fit its transfer
    │   └── SignatureError       a missing, unknown or wrong signature
    ├── ConfigError              a setting that cannot work
    ├── TransportError           the broker cannot be reached or refused us
    ├── PreprocessError          an image the pipeline cannot use (undecodable, blank, ...)
    ├── ModelError               a model that cannot be loaded or run
    └── StoreError               the local sample store cannot do what was asked

Each error carries a short machine-readable ``reason`` (for events on the wire) besides
its human message.
"""

from __future__ import annotations

__all__ = [
    "ChunkError",
    "ConfigError",
    "FedgeError",
    "FrameError",
    "MessageError",
    "ModelError",
    "PreprocessError",
    "ProtocolError",
    "SignatureError",
    "StoreError",
    "TensorCodecError",
    "TopicError",
    "TransportError",
]


class FedgeError(Exception):
    """Root of every error fedge raises on purpose."""

    default_reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason


class ProtocolError(FedgeError):
    """Bytes or text received from the network that fedge refuses."""

    default_reason = "protocol"


class TopicError(ProtocolError):
    default_reason = "bad_topic"


class MessageError(ProtocolError):
    default_reason = "bad_message"


class FrameError(ProtocolError):
    default_reason = "bad_frame"


class TensorCodecError(ProtocolError):
    default_reason = "bad_tensors"


class ChunkError(ProtocolError):
    default_reason = "bad_chunk"


class SignatureError(ProtocolError):
    default_reason = "bad_signature"


class ConfigError(FedgeError):
    default_reason = "bad_config"


class TransportError(FedgeError):
    default_reason = "transport"


class PreprocessError(FedgeError):
    default_reason = "bad_image"


class ModelError(FedgeError):
    default_reason = "bad_model"


class StoreError(FedgeError):
    default_reason = "store"
