"""Decoding and encoding of every wire message, through one TypeAdapter."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import Field, TypeAdapter, ValidationError

from protocol.chunks import BlobManifest
from protocol.errors import MessageError
from protocol.messages.agent import (
    AgentStatus,
    Capabilities,
    CommandAck,
    ErrorEvent,
    InferenceResult,
)
from protocol.messages.base import Message
from protocol.messages.commands import (
    LabelFrame,
    LoadModel,
    OperatorCommand,
    Ping,
    RequestStatus,
    SetOptions,
    StartRounds,
    StopRounds,
)
from protocol.messages.rounds import (
    BlobRef,
    CoordinatorStatus,
    ModelRelease,
    RoundAnnouncement,
    RoundConfig,
    UpdateComplete,
)
from protocol.messages.secagg import (
    AgentKeys,
    EncryptedShares,
    KeyDirectory,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
)
from protocol.preprocess import PreprocessSpec
from protocol.signing import SignedMessage

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MESSAGE_TYPES",
    "decode_message",
    "encode_message",
    "message_schema",
]

MAX_MESSAGE_BYTES = 1024 * 1024
_MAX_ERRORS_REPORTED = 3

# Every top-level message kind; nested-only models (timings, predictions) are not here.
MESSAGE_TYPES: tuple[type[Message], ...] = (
    AgentStatus,
    Capabilities,
    InferenceResult,
    CommandAck,
    ErrorEvent,
    Ping,
    RequestStatus,
    LoadModel,
    SetOptions,
    LabelFrame,
    StartRounds,
    StopRounds,
    OperatorCommand,
    RoundConfig,
    RoundAnnouncement,
    ModelRelease,
    BlobRef,
    UpdateComplete,
    CoordinatorStatus,
    BlobManifest,
    SignedMessage,
    PreprocessSpec,
    AgentKeys,
    KeyDirectory,
    EncryptedShares,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
)

AnyMessage = Annotated[
    AgentStatus
    | Capabilities
    | InferenceResult
    | CommandAck
    | ErrorEvent
    | Ping
    | RequestStatus
    | LoadModel
    | SetOptions
    | LabelFrame
    | StartRounds
    | StopRounds
    | OperatorCommand
    | RoundConfig
    | RoundAnnouncement
    | ModelRelease
    | BlobRef
    | UpdateComplete
    | CoordinatorStatus
    | BlobManifest
    | SignedMessage
    | PreprocessSpec
    | AgentKeys
    | KeyDirectory
    | EncryptedShares
    | ShareInbox
    | UnmaskRequest
    | UnmaskShares,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(AnyMessage)

M = TypeVar("M", bound=Message)


def encode_message(message: Message) -> bytes:
    return message.model_dump_json(exclude_none=True).encode("utf-8")


def decode_message(
    data: bytes | str,
    expected: type[M] | tuple[type[M], ...] = Message,  # type: ignore[assignment]
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> M:
    """Decode any fedge message from JSON; raise :class:`MessageError` on anything else.

    ``expected`` narrows what the caller accepts: a valid message of another kind is
    refused with reason ``unexpected_kind``.
    """
    if len(data) > max_bytes:
        raise MessageError(f"message of {len(data)} bytes exceeds {max_bytes}", reason="too_large")
    try:
        message = _ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise MessageError(_describe(exc), reason="invalid") from exc
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"not a JSON message: {exc}", reason="invalid") from exc
    if not isinstance(message, expected):
        names = (
            ", ".join(_kind_of(t) for t in expected)
            if isinstance(expected, tuple)
            else _kind_of(expected)
        )
        raise MessageError(
            f"expected {names}, got {message.kind!r}",  # type: ignore[attr-defined]
            reason="unexpected_kind",
        )
    return message


def message_schema() -> dict[str, Any]:
    """JSON Schema of every message, one definition per kind, plus the tagged union."""
    schema = _ADAPTER.json_schema()
    schema["title"] = "fedge message"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _kind_of(message_type: type[Message]) -> str:
    field = message_type.model_fields.get("kind")
    return str(field.default) if field is not None else message_type.__name__


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_input=False)[:_MAX_ERRORS_REPORTED]:
        location = ".".join(str(part) for part in error["loc"]) or "message"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "invalid message: " + "; ".join(parts)
