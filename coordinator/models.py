"""The registry of model definitions the coordinator can federate.

A :class:`ModelDefinition` names an architecture and builds it twice: as a seeded Keras model
(the source of the initial weights, and of evaluation on the coordinator) and as a trainable
``tf.Module`` whose signatures convert to a builtin-only ``.tflite`` that trains inside LiteRT
(see :mod:`coordinator.trainable`). Both carry the same weights in the same order.

TensorFlow is imported only when a model is built, so reading the registry stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from coordinator.reference import (
    DIGIT_SIDE_PX,
    DIGITS_CLASSES,
    LEARNING_RATE,
    MODEL_SEED,
    build_reference_cnn,
)
from protocol.errors import ConfigError
from runtime.architectures import keras_architecture

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["MODEL_NAMES", "ModelDefinition", "get_model_definition"]

# Hide TensorFlow's C++ INFO and WARNING lines; only effective before TensorFlow loads.
_TF_CPP_MIN_LOG_LEVEL = "2"
_MLP_HIDDEN_UNITS = 32


def _import_keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_MIN_LOG_LEVEL)
    import keras

    return keras


@dataclass(frozen=True, slots=True)
class ModelDefinition:
    """One architecture: its input (h, w, c), its classes and how to build it."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    keras_builder: Callable[[], keras.Model] = field(repr=False, compare=False)

    def build_keras(self) -> keras.Model:
        """The Keras model with its seeded initial weights (re-seeds Keras globally)."""
        keras = _import_keras()
        keras.utils.set_random_seed(MODEL_SEED)
        return self.keras_builder()

    def build_trainable(self, batch_size: int) -> tf.Module:
        """A module with ``infer``/``train``/``get_weights``/``set_weights`` signatures.

        It starts from :meth:`build_keras`'s initial weights; ``train`` takes batches of
        exactly ``batch_size`` examples.
        """
        from coordinator.trainable import build_trainable_module

        return build_trainable_module(self.build_keras(), batch_size=batch_size)


def _build_digits_mlp() -> keras.Model:
    """A small dense model, compiled like the reference CNN."""
    keras = _import_keras()
    model = keras_architecture("digits_mlp", keras)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


_DIGITS_SHAPE = (DIGIT_SIDE_PX, DIGIT_SIDE_PX, 1)
_DEFINITIONS: Mapping[str, ModelDefinition] = MappingProxyType(
    {
        d.name: d
        for d in (
            ModelDefinition("digits_cnn", _DIGITS_SHAPE, DIGITS_CLASSES, build_reference_cnn),
            ModelDefinition("digits_mlp", _DIGITS_SHAPE, DIGITS_CLASSES, _build_digits_mlp),
        )
    }
)
MODEL_NAMES: tuple[str, ...] = tuple(_DEFINITIONS)


def get_model_definition(name: str) -> ModelDefinition:
    """The definition registered under ``name``; :class:`ConfigError` for unknown names."""
    try:
        return _DEFINITIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}",
            reason="unknown_model",
        ) from None
