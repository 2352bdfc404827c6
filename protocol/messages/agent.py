"""Messages an agent publishes: its status (birth and LWT), results and events."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from protocol.messages.base import Id, Message, NonNegativeFloat, ShortText
from protocol.messages.variants import VariantChoice

__all__ = [
    "AgentState",
    "AgentStatus",
    "Capabilities",
    "CommandAck",
    "DetectedObject",
    "ErrorEvent",
    "FrameCounters",
    "InferenceResult",
    "OutputTensor",
    "Personalisation",
    "Prediction",
    "Timings",
]

Label = Annotated[str, Field(min_length=1, max_length=64)]
Count = Annotated[int, Field(ge=0)]


class AgentState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Capabilities(Message):
    """What an agent can do; part of its birth message."""

    kind: Literal["capabilities"] = "capabilities"
    runtime: ShortText  # e.g. "ai_edge_litert 2.3.0"
    can_train: bool = False
    trainers: tuple[ShortText, ...] = ()
    agent_version: ShortText = "unknown"
    model_version: Id | None = None


class FrameCounters(Message):
    kind: Literal["frame_counters"] = "frame_counters"
    received: Count = 0
    processed: Count = 0
    dropped_stale: Count = 0
    dropped_rate: Count = 0
    rejected: Count = 0


Accuracy = Annotated[float, Field(ge=0.0, le=1.0)]


class Personalisation(Message):
    """A head fine-tuned on the agent's own samples after a release (FedPer-style), served
    instead of the release's; both measured on the agent's held-out split."""

    kind: Literal["personalisation"] = "personalisation"
    model_version: Id  # the release the personal head started from
    held_out: Count  # samples in the held-out split (never trained on)
    trained_on: Count
    global_accuracy: Accuracy | None = None  # None when nothing is held out
    personal_accuracy: Accuracy | None = None
    serving: Literal["personal", "global"] = "personal"


class AgentStatus(Message):
    """Retained on the agent's status topic; the LWT carries the same shape, offline."""

    kind: Literal["agent_status"] = "agent_status"
    agent: Id
    state: AgentState
    timestamp: NonNegativeFloat
    capabilities: Capabilities | None = None
    samples_by_label: dict[Label, Count] = Field(default_factory=dict)
    frames: FrameCounters | None = None
    resident_bytes: Count | None = None  # the agent process's resident memory (RSS)
    waiting_for: ShortText | None = None  # what the agent waits for, e.g. a release's chunks
    # A blob whose retained chunks stopped coming (a broker that lost them): its owner,
    # the coordinator, publishes them again.
    stalled_blob: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    # The release variant it serves, why, and each variant's latency and accuracy here.
    variant: VariantChoice | None = None
    personalisation: Personalisation | None = None


class Prediction(Message):
    kind: Literal["prediction"] = "prediction"
    index: Count
    label: ShortText
    score: float


Pixel = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class DetectedObject(Message):
    """One object a detector found, its box in pixels of the frame as it was sent."""

    kind: Literal["detected_object"] = "detected_object"
    index: Count  # class index as the model numbers it
    label: ShortText
    score: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    box: tuple[Pixel, Pixel, Pixel, Pixel]  # x_min, y_min, x_max, y_max (as Frigate's)


class OutputTensor(Message):
    """A raw model output in compact form: every value if small, else a summary."""

    kind: Literal["output_tensor"] = "output_tensor"
    name: ShortText
    shape: tuple[Count, ...]
    dtype: ShortText
    values: tuple[float, ...] | None = None
    truncated: bool = False  # values holds only the first elements
    minimum: float | None = None
    maximum: float | None = None
    mean: float | None = None
    std: float | None = None


class Timings(Message):
    """Where the time of one frame went, in milliseconds."""

    kind: Literal["timings"] = "timings"
    decode_ms: NonNegativeFloat
    preprocess_ms: NonNegativeFloat
    invoke_ms: NonNegativeFloat
    total_ms: NonNegativeFloat
    # Only when the frame's envelope carried the camera's timestamp (clocks may differ).
    since_capture_ms: float | None = None


class InferenceResult(Message):
    """What the model said about one frame, with the time each stage took."""

    kind: Literal["inference_result"] = "inference_result"
    agent: Id
    source: Id
    frame_id: ShortText
    model_version: ShortText
    timestamp: NonNegativeFloat
    timings: Timings
    predictions: tuple[Prediction, ...] = ()
    outputs: tuple[OutputTensor, ...] = ()
    # Only for detectors (absent otherwise, so classifier results read as before).
    objects: tuple[DetectedObject, ...] | None = None


class CommandAck(Message):
    """The answer to every command: ok with details, or an error with a reason."""

    kind: Literal["command_ack"] = "command_ack"
    command_id: ShortText
    command: ShortText
    ok: bool
    reason: ShortText | None = None
    message: ShortText | None = None
    detail: dict[ShortText, str | int | float | bool | None] = Field(default_factory=dict)

    @classmethod
    def answering(
        cls,
        command: Message,
        *,
        ok: bool,
        reason: str | None = None,
        message: str | None = None,
        detail: dict[str, str | int | float | bool | None] | None = None,
    ) -> CommandAck:
        """The acknowledgement of ``command`` (any message with a ``command_id``)."""
        return cls(
            command_id=str(getattr(command, "command_id", "")),
            command=str(getattr(command, "kind", "")),
            ok=ok,
            reason=reason,
            message=message[:1024] if message else None,
            detail=detail or {},
        )


class ErrorEvent(Message):
    """Something received was refused or failed; names why so the sender can fix it."""

    kind: Literal["error"] = "error"
    reason: ShortText
    message: ShortText
    topic: ShortText | None = None
    frame_id: ShortText | None = None
    timestamp: NonNegativeFloat = 0.0
