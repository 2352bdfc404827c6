"""Commands sent to an agent or to the coordinator. Each is answered by a CommandAck."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from protocol.messages.base import Id, Message, ShortText

__all__ = [
    "AgentCommand",
    "CoordinatorCommand",
    "LabelFrame",
    "LoadModel",
    "OperatorCommand",
    "Ping",
    "RequestStatus",
    "SetOptions",
    "StartRounds",
    "StopRounds",
]

CommandId = Annotated[str, Field(min_length=1, max_length=128)]
MAX_COMMAND_TEXT_CHARS = 64 * 1024


class Ping(Message):
    """Ask for a sign of life; answered by an ok command_ack."""

    kind: Literal["ping"] = "ping"
    command_id: CommandId


class RequestStatus(Message):
    """Ask for a full status report in the command_ack (and a fresh status message)."""

    kind: Literal["status"] = "status"
    command_id: CommandId


class LoadModel(Message):
    """Load (or reload) a model from a path on the agent, or a fleet model version."""

    kind: Literal["load_model"] = "load_model"
    command_id: CommandId
    path: Annotated[str, Field(max_length=4096)] | None = None
    labels_path: Annotated[str, Field(max_length=4096)] | None = None
    version: Id | None = None


class SetOptions(Message):
    """Change runtime options without a restart; omitted fields stay as they are."""

    kind: Literal["set_options"] = "set_options"
    command_id: CommandId
    max_fps: Annotated[float, Field(gt=0.0, le=1000.0)] | None = None
    top_k: Annotated[int, Field(ge=1, le=100)] | None = None
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    # Detectors: override the model's detection spec on this agent.
    detection_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_objects: Annotated[int, Field(ge=1, le=1000)] | None = None
    iou_threshold: Annotated[float, Field(gt=0.0, le=1.0)] | None = None


class LabelFrame(Message):
    """Turn a recently seen frame into a labelled training sample."""

    kind: Literal["label"] = "label"
    command_id: CommandId
    frame_id: ShortText
    label: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    source: Id | None = None


AgentCommand = Annotated[
    Ping | RequestStatus | LoadModel | SetOptions | LabelFrame, Field(discriminator="kind")
]


class StartRounds(Message):
    """Ask the coordinator to run federated rounds."""

    kind: Literal["start_rounds"] = "start_rounds"
    command_id: CommandId
    rounds: Annotated[int, Field(ge=1, le=100_000)] = 1
    min_agents: Annotated[int, Field(ge=1)] = 1
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    deadline_s: Annotated[float, Field(gt=0.0, le=86_400.0)] = 60.0
    strategy: ShortText = "fedavg"
    options: dict[ShortText, str | int | float | bool] = Field(default_factory=dict)
    # One of the coordinator's tasks (its ``tasks`` setting); none: the fleet's own task.
    task: Id | None = None


class StopRounds(Message):
    """Ask the coordinator to stop after the current round."""

    kind: Literal["stop_rounds"] = "stop_rounds"
    command_id: CommandId
    reason: ShortText = "requested"
    # Who asked, as the sender says (``fedge round stop`` sends user@host); an operator
    # signature, where the fleet requires one, is the proof.
    requested_by: ShortText | None = None
    task: Id | None = None  # one of several tasks; none: the fleet's own rounds


class OperatorCommand(Message):
    """What an operator signs: a command's JSON text, for one topic, at one moment.

    It travels inside a SignedMessage; see protocol.operator.
    """

    kind: Literal["operator_command"] = "operator_command"
    command: Annotated[str, Field(max_length=MAX_COMMAND_TEXT_CHARS)]
    topic: ShortText
    issued_at: Annotated[float, Field(ge=0.0)]
    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{16,64}$")]


CoordinatorCommand = Annotated[
    StartRounds | StopRounds | Ping | RequestStatus, Field(discriminator="kind")
]
