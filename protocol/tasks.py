"""The task spec: what the fleet learns (labels, model recipe, preprocessing, training defaults).

A task is written by the user as a TOML file and read by the coordinator
(:mod:`coordinator.tasks`), which also checks what this pure model cannot: that files exist and
that shapes fit. Recipes:

- ``builtin``: a model that ships with fedge (``digits_cnn``, ``digits_mlp``);
- ``transfer``: a frozen backbone ``.tflite`` (any feature extractor, float or int8; a spatial
  output is average-pooled) and a trainable head (optional hidden Dense layers, softmax over the
  task's labels). Only the head travels in rounds.
- ``keras``: the user's own Keras model file (``.keras``: a chain of layers ending in a softmax
  over the task's labels). Agents without TensorFlow train it in LiteRT when every layer has a
  builtin-only training graph; otherwise only agents with TensorFlow (Keras) train it.
- ``split``: split learning (SplitFed v2): a built-in architecture or a ``.keras`` file cut in
  two at a layer; agents train the layers below the cut through a builtin-only ``.tflite``, the
  coordinator the rest in Keras. ``u_shaped`` keeps the last layers (and the labels) on the
  agent; ``federate`` averages the agents' lower parts at the end of each round.

Example (``door.toml``)::

    name = "door"
    labels = ["empty", "person", "parcel"]

    [recipe]
    kind = "transfer"
    backbone = "backbones/features.tflite"
    hidden_units = [64]

    [preprocess]
    height = 64
    width = 64

    [training]
    epochs = 2
    learning_rate = 0.1
    min_samples = 8
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from protocol.messages.base import Id, Message, ShortText
from protocol.preprocess import PreprocessSpec

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinRecipe",
    "KerasRecipe",
    "Recipe",
    "SplitRecipe",
    "TaskSpec",
    "TrainingDefaults",
    "TransferRecipe",
]

BUILTIN_MODELS = ("digits_cnn", "digits_mlp")
MAX_LABELS = 1000
MAX_HIDDEN_LAYERS = 4

Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]


class BuiltinRecipe(Message):
    """A model that ships with fedge."""

    kind: Literal["builtin"] = "builtin"
    model: Literal["digits_cnn", "digits_mlp"] = Field(
        "digits_cnn", description="the built-in model (8x8 grey digits, 10 labels)"
    )


class TransferRecipe(Message):
    """A frozen backbone ``.tflite`` and a trainable head over its (pooled) features."""

    kind: Literal["transfer"] = "transfer"
    # A path, relative to the task file; read and checked by the coordinator.
    backbone: Annotated[
        ShortText,
        Field(min_length=1, description="feature-extractor .tflite, relative to the task file"),
    ]
    hidden_units: Annotated[
        tuple[Annotated[int, Field(ge=1, le=4096)], ...], Field(max_length=MAX_HIDDEN_LAYERS)
    ] = Field((), description="hidden Dense (relu) layers of the head, e.g. [64]")
    head_seed: Annotated[int, Field(ge=0, description="seed of the head's initial weights")] = 0


class KerasRecipe(Message):
    """The user's own Keras model, trained whole by the fleet."""

    kind: Literal["keras"] = "keras"
    # A path, relative to the task file; read and checked by the coordinator.
    model: Annotated[
        ShortText,
        Field(min_length=1, description="the model's .keras file, relative to the task file"),
    ]


LayerRef = (
    Annotated[int, Field(ge=0, le=10_000)] | Annotated[str, Field(min_length=1, max_length=128)]
)


class SplitRecipe(Message):
    """A model cut in two: the agents train the layers below the cut, the coordinator the rest."""

    kind: Literal["split"] = "split"
    # A built-in architecture's name, or a path relative to the task file.
    model: Annotated[
        ShortText,
        Field(min_length=1, description="a built-in architecture or a .keras file"),
    ]
    cut: LayerRef = Field(
        description="the first layer the coordinator runs: its index, or its name"
    )
    u_shaped: bool = Field(
        default=False, description="the agents also run the last layers, so labels never leave them"
    )
    top: LayerRef | None = Field(
        None, description="u_shaped: the first layer back on the agent (default: the last)"
    )
    federate: bool = Field(
        default=False, description="average the agents' lower parts by batches at each round's end"
    )


Recipe = Annotated[
    BuiltinRecipe | TransferRecipe | KerasRecipe | SplitRecipe, Field(discriminator="kind")
]


class TrainingDefaults(Message):
    """How agents train each round, unless a round's plan says otherwise."""

    kind: Literal["training_defaults"] = "training_defaults"
    epochs: Annotated[int, Field(ge=1, le=1000, description="local epochs per round")] = 1
    batch_size: Annotated[int, Field(ge=1, le=1024, description="local batch size")] = 16
    learning_rate: Annotated[
        float, Field(gt=0.0, le=10.0, description="local SGD learning rate")
    ] = 0.05
    min_samples: Annotated[
        int,
        Field(ge=1, le=10**6, description="fewer samples of the task's labels: the agent sits out"),
    ] = 1
    validation_fraction: Annotated[
        float, Field(ge=0.0, le=0.5, description="local hold-out reported in updates")
    ] = 0.0
    eval_fraction: Annotated[
        float,
        Field(
            ge=0.0,
            le=0.5,
            description="share of each agent's samples held out for federated evaluation",
        ),
    ] = 0.2


class TaskSpec(Message):
    """One task: its labels in class order, its recipe, preprocessing and training defaults."""

    kind: Literal["task"] = "task"
    name: Annotated[Id, Field(description="the task's name: letters, digits, `_.-`")]
    labels: Annotated[
        tuple[Label, ...],
        Field(min_length=2, max_length=MAX_LABELS, description="class names, in class order"),
    ]
    recipe: Recipe
    preprocess: PreprocessSpec
    training: TrainingDefaults = TrainingDefaults()

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            msg = f"labels must be unique; repeated: {', '.join(repeated)}"
            raise ValueError(msg)
        return labels
