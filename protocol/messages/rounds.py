"""Messages of federated rounds: announcements, update completion, coordinator status."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from protocol.messages.base import Id, Message, NonNegativeFloat, ShortText
from protocol.messages.evaluation import Evaluation
from protocol.messages.secagg import SecAggParams
from protocol.messages.variants import ActivationRanges, CalibrationSource
from protocol.preprocess import PreprocessSpec

__all__ = [
    "BlobRef",
    "CoordinatorState",
    "CoordinatorStatus",
    "ModelMetrics",
    "ModelRelease",
    "ModelVariant",
    "PrivacySpent",
    "RoundAnnouncement",
    "RoundConfig",
    "UpdateComplete",
    "UpdateEncoding",
    "UpdateTimings",
]

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]
RoundNumber = Annotated[int, Field(ge=0, le=10**9)]


class UpdateEncoding(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"
    # Secure aggregation: little-endian uint32 words, quantised update plus masks mod 2^32.
    MASKED_U32 = "masked_u32"


class BlobRef(Message):
    """Where a content-addressed blob lives: its chunks are on the blob's own topics."""

    kind: Literal["blob_ref"] = "blob_ref"
    sha256: Sha256Hex
    size_bytes: Count
    chunk_count: Count
    chunk_bytes: Annotated[int, Field(ge=1)]
    content_type: ShortText = "application/octet-stream"


class ModelMetrics(Message):
    kind: Literal["model_metrics"] = "model_metrics"
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    loss: Annotated[float, Field(allow_inf_nan=False)] | None = None
    evaluated_on: Count = 0


class ModelVariant(Message):
    """One serving model of a release: the float32 model or a compressed form of it."""

    kind: Literal["model_variant"] = "model_variant"
    name: Id
    blob: BlobRef
    quantization: Literal["float32", "int8_static", "int8_dynamic"]
    calibration: CalibrationSource | None = None
    # Fraction of the weights that are exactly zero.
    sparsity: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    # Size of the .tflite compressed (gzip -9): what pruning's zeros save on a wire or disk.
    compressed_bytes: Count = 0
    parameters: Count = 0
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    evaluated_on: Count = 0


class PrivacySpent(Message):
    """The differential privacy a fleet's data has spent up to a release (DP-FedAvg).

    User-level (epsilon, delta): one agent's whole sample store is the unit protected.
    """

    kind: Literal["privacy_spent"] = "privacy_spent"
    epsilon: NonNegativeFloat
    delta: Annotated[float, Field(gt=0.0, lt=1.0)]
    rounds: Count
    noise_multiplier: Annotated[float, Field(gt=0.0)]
    clip_norm: Annotated[float, Field(gt=0.0)]
    accounting: ShortText = "rdp, no sampling amplification"
    # The plan's budget when this release was made (rounds stop before passing it).
    target_epsilon: Annotated[float, Field(gt=0.0)] | None = None


class ModelRelease(Message):
    """One model version: the blobs an agent needs, signed by the coordinator.

    ``weights`` changes every round; ``trainable`` (the trainable .tflite, whose ``infer``
    signature also serves inference) and the inference files change only with the
    architecture, so an agent downloads them once and keeps them by hash.
    """

    kind: Literal["model_release"] = "model_release"
    version: Id
    model_name: Id
    # "transfer": ``trainable`` is the frozen backbone .tflite and ``weights`` the head's.
    # "keras": the user's own model; ``keras_model`` is its .keras file.
    recipe: Literal["builtin", "transfer", "keras"] = "builtin"
    round: RoundNumber
    weights: BlobRef
    trainable: BlobRef
    inference: BlobRef | None = None
    inference_int8: BlobRef | None = None
    labels: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...]
    preprocess: PreprocessSpec
    train_batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    metrics: ModelMetrics | None = None
    created_at: NonNegativeFloat = 0.0
    privacy: PrivacySpent | None = None
    variants: tuple[ModelVariant, ...] = ()
    # Pruned training (protocol.masks): which weights are kept; agents hold the others at zero.
    prune_mask: BlobRef | None = None
    # The user's .keras file (architecture and initial weights), for agents training in Keras.
    keras_model: BlobRef | None = None
    # The trainer kinds that can train this release (agents' capabilities name theirs).
    trainers: tuple[Literal["litert", "keras"], ...] = ("litert", "keras")
    # Why a LiteRT-only agent cannot train it (its ``trainable`` is then not trainable).
    litert_refusal: ShortText | None = None


class RoundConfig(Message):
    """How agents train in one round."""

    kind: Literal["round_config"] = "round_config"
    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05
    proximal_mu: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    update_encoding: UpdateEncoding = UpdateEncoding.FLOAT32
    augment: bool = False  # augment training images as the preprocessing allows
    validation_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    seed: Count = 0
    # Share of each agent's samples held out (by a hash of the sample id, so the same ones
    # every round) for federated evaluation; never trained on. 0 turns it off.
    eval_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    # DP-FedAvg: every agent clips its update (the change to the weights) to this L2 norm.
    clip_norm: Annotated[float, Field(gt=0.0, le=1e6)] | None = None
    # Secure aggregation: the coordinator sees only the sum of the updates.
    secure_aggregation: SecAggParams | None = None
    # Fewer samples of the task's labels than this: the agent sits the round out.
    min_samples: Annotated[int, Field(ge=1, le=10**6)] = 1


class RoundAnnouncement(Message):
    """Retained on the current-round topic, signed by the coordinator."""

    kind: Literal["round_announcement"] = "round_announcement"
    round: RoundNumber
    release: ModelRelease
    selected: tuple[Id, ...]
    config: RoundConfig
    deadline_at: NonNegativeFloat
    issued_at: NonNegativeFloat


class UpdateTimings(Message):
    """When an agent's steps of a round happened, by its own clock (seconds since the epoch).

    Benchmarks split a round's wall time into phases with them; they steer nothing.
    """

    kind: Literal["update_timings"] = "update_timings"
    received_at: NonNegativeFloat  # the announcement arrived (network thread)
    started_at: NonNegativeFloat  # the round's worker took it up
    ready_at: NonNegativeFloat  # blobs fetched, trainer loaded, samples prepared
    trained_at: NonNegativeFloat  # local training done
    sent_at: NonNegativeFloat  # the update encoded and handed to the outbox


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
    # With a clip norm: whether the update's norm was above it (adaptive clipping counts them).
    clipped: bool | None = None
    # Federated evaluation of the round's starting model on the agent's held-out split.
    evaluation: Evaluation | None = None
    # Min/max of the release's float serving model over the agent's samples (int8 calibration).
    activation_ranges: ActivationRanges | None = None
    timings: UpdateTimings | None = None


class CoordinatorState(StrEnum):
    IDLE = "idle"
    ANNOUNCED = "announced"
    AGGREGATING = "aggregating"
    OFFLINE = "offline"


class TaskProgress(Message):
    """One of several tasks the coordinator runs at once, in its status."""

    kind: Literal["task_progress"] = "task_progress"
    state: CoordinatorState
    round: RoundNumber | None = None
    model_version: Id | None = None
    agents: Count = 0  # the agents the scheduler gives the task now
    selected: Count = 0
    updates_received: Count = 0
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    detail: ShortText | None = None


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
    # Agents online that the round left out, and why (e.g. no trainer this model fits).
    left_out: dict[Id, ShortText] = Field(default_factory=dict)
    # With DP-FedAvg: the (epsilon, delta) spent so far.
    epsilon: Annotated[float, Field(ge=0.0)] | None = None
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    # Several tasks at once: each one's own progress, by task name.
    tasks: Annotated[dict[Id, TaskProgress], Field(max_length=256)] = Field(default_factory=dict)
