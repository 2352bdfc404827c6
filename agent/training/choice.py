"""Which trainer an agent gets: what is installed, what the release and the config ask."""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from protocol.errors import ConfigError
from runtime.architectures import ARCHITECTURE_NAMES, keras_architecture

if TYPE_CHECKING:
    from protocol.messages.rounds import ModelRelease

from agent.training.base import DEFAULT_BATCH_SIZE, TRAINER_KINDS, Trainer
from agent.training.keras_trainer import KerasTrainer, build_keras_model, load_keras_model
from agent.training.litert_trainer import LiteRTTrainer

_log = logging.getLogger(__name__)


# --- choosing a backend ------------------------------------------------------------------


def _module_available(name: str) -> bool:
    # find_spec locates a top-level module without importing it.
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_trainers() -> list[str]:
    """The trainer kinds this machine can run, cheaply checked (nothing is imported).

    ``"litert"`` needs any TFLite interpreter (LiteRT, tflite-runtime or TensorFlow);
    ``"keras"`` needs TensorFlow and Keras.
    """
    kinds = []
    if any(_module_available(m) for m in ("ai_edge_litert", "tflite_runtime", "tensorflow")):
        kinds.append("litert")
    if _module_available("tensorflow") and _module_available("keras"):
        kinds.append("keras")
    return kinds


def fitting_trainer(release: ModelRelease, kind: str, fallback: str | None) -> str:
    """The trainer kind to train ``release`` with: ``kind``, else ``fallback`` if it fits."""
    if kind in release.trainers:
        return kind
    if fallback is not None and fallback in release.trainers:
        return fallback
    why = f": {release.litert_refusal}" if release.litert_refusal else ""
    raise ConfigError(
        f"release {release.version} needs the {' or '.join(release.trainers)} trainer, this "
        f"agent trains with {kind}{why}",
        reason="no_fitting_trainer",
    )


def make_trainer(
    kind: str,
    *,
    trainable_tflite: bytes | None = None,
    model_name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    keras_model: bytes | None = None,
) -> Trainer:
    """A trainer of ``kind`` (one of :data:`TRAINER_KINDS`).

    ``"litert"`` trains ``trainable_tflite`` (batch ``batch_size``); ``"keras"`` loads the
    ``.keras`` file ``keras_model`` (a task's own model) if given, else builds the
    architecture ``model_name`` (one of ``runtime.architectures.ARCHITECTURE_NAMES``) with its
    initial weights.
    """
    if kind not in TRAINER_KINDS:
        raise ConfigError(
            f"unknown trainer {kind!r}; choose one of {', '.join(TRAINER_KINDS)}",
            reason="bad_trainer",
        )
    if kind not in available_trainers():
        raise ConfigError(f"the {kind} trainer cannot run here", reason="trainer_unavailable")
    if kind == "litert":
        if trainable_tflite is None:
            raise ConfigError("the litert trainer needs a trainable .tflite", reason="bad_trainer")
        return LiteRTTrainer(trainable_tflite, batch_size=batch_size)
    if keras_model is not None:
        return KerasTrainer(lambda: load_keras_model(keras_model))
    if model_name is None:
        raise ConfigError("the keras trainer needs a model name", reason="bad_trainer")
    if model_name not in ARCHITECTURE_NAMES:  # an unknown name fails before TensorFlow loads
        keras_architecture(model_name, None)
    return KerasTrainer(lambda: build_keras_model(model_name))
