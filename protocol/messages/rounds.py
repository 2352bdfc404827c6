"""Messages of federated rounds: announcements, update completion, coordinator status."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from protocol.messages.base import Id, Message, NonNegativeFloat, ShortText

__all__ = [
    "CoordinatorState",
    "CoordinatorStatus",
    "RoundAnnouncement",
    "RoundConfig",
    "UpdateComplete",
    "UpdateEncoding",
]

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]
RoundNumber = Annotated[int, Field(ge=0, le=10**9)]


class UpdateEncoding(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"


class RoundConfig(Message):
    """How agents train in one round."""

    kind: Literal["round_config"] = "round_config"
    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05
    proximal_mu: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    update_encoding: UpdateEncoding = UpdateEncoding.FLOAT32
    seed: Count = 0


class RoundAnnouncement(Message):
    """Retained on the current-round topic, signed by the coordinator."""

    kind: Literal["round_announcement"] = "round_announcement"
    round: RoundNumber
    model_version: Id
    bundle_sha256: Sha256Hex
    bundle_size_bytes: Count
    selected: tuple[Id, ...]
    config: RoundConfig
    deadline_at: NonNegativeFloat
    issued_at: NonNegativeFloat


class UpdateComplete(Message):
    """Published by an agent once every chunk of its update is out."""

    kind: Literal["update_complete"] = "update_complete"
    round: RoundNumber
    agent: Id
    base_model_version: Id
    update_sha256: Sha256Hex
    update_size_bytes: Count
    chunk_count: Count
    chunk_bytes: Annotated[int, Field(ge=1)]
    encoding: UpdateEncoding
    num_examples: Annotated[int, Field(ge=1)]
    loss: Annotated[float, Field(allow_inf_nan=False)] | None = None
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    train_seconds: NonNegativeFloat = 0.0


class CoordinatorState(StrEnum):
    IDLE = "idle"
    ANNOUNCED = "announced"
    AGGREGATING = "aggregating"
    OFFLINE = "offline"


class CoordinatorStatus(Message):
    """Retained on the coordinator status topic: what it is doing now."""

    kind: Literal["coordinator_status"] = "coordinator_status"
    state: CoordinatorState
    timestamp: NonNegativeFloat
    round: RoundNumber | None = None
    model_version: Id | None = None
    agents_online: Count = 0
    updates_received: Count = 0
    selected: Count = 0
    detail: ShortText | None = None
