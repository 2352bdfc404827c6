"""Training with Keras where TensorFlow is installed; imported only when one is built."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from protocol.errors import ModelError
from runtime.architectures import ARCHITECTURE_NAMES, keras_architecture, load_keras_file

if TYPE_CHECKING:
    import keras

from agent.training.base import (
    _MODEL_SEED,
    _PREDICT_CHUNK,
    _TF_CPP_MIN_LOG_LEVEL,
    FloatArray,
    TrainConfig,
    Trainer,
    _Step,
)

_log = logging.getLogger(__name__)


# --- Keras -----------------------------------------------------------------------------


def _import_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_MIN_LOG_LEVEL)
    import tensorflow as tf

    return tf


def build_keras_model(name: str) -> keras.Model:
    """The named architecture with its seeded initial weights (re-seeds Keras globally)."""
    if name not in ARCHITECTURE_NAMES:
        keras_architecture(name, None)  # the ConfigError that names the known ones
    _import_tf()  # before Keras loads TensorFlow, so its log level applies
    import keras

    keras.utils.set_random_seed(_MODEL_SEED)
    return keras_architecture(name, keras)


def load_keras_model(content: bytes) -> keras.Model:
    """A ``.keras`` file's model, in Keras's safe mode (no code from the file runs)."""
    _import_tf()  # before Keras loads TensorFlow, so its log level applies
    import keras

    return load_keras_file(content, keras)


class KerasTrainer(Trainer):
    """Trains a Keras model (softmax output) with TensorFlow; frozen weights stay put."""

    name: ClassVar[str] = "keras"

    def __init__(self, build_model: Callable[[], keras.Model]) -> None:
        self._tf = tf = _import_tf()
        import keras

        try:
            model = build_model()
        except (ValueError, TypeError, tf.errors.OpError) as exc:
            raise ModelError(f"cannot build the Keras model: {exc}", reason="bad_model") from exc
        self._model = model
        self._variables = list(model.trainable_variables)
        # get_weights/set_weights move every weight; SGD steps only the trainable ones.
        self._shapes = [tuple(int(d) for d in v.shape) for v in model.weights]
        self._trainable_at = [i for i, v in enumerate(model.weights) if v.trainable]
        self._input_shape = tuple(int(d) for d in model.input_shape[1:])
        self._num_classes = int(model.output_shape[-1])
        loss_fn = keras.losses.sparse_categorical_crossentropy

        def sgd_step(x: Any, y: Any, lr: Any, mu: Any, anchor: Sequence[Any]) -> Any:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
            grads = tape.gradient(loss, self._variables)
            # Both terms at the step's starting weights: plain SGD on loss + proximal term.
            updates = [
                lr * (g + mu * (v.value - a))
                for v, g, a in zip(self._variables, grads, anchor, strict=True)
            ]
            for variable, update in zip(self._variables, updates, strict=True):
                variable.assign_sub(update)
            return loss

        self._sgd_step = tf.function(sgd_step, reduce_retracing=True)

    @property
    def model(self) -> keras.Model:
        return self._model

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def get_weights(self) -> list[np.ndarray]:
        return [np.asarray(w, dtype=np.float32) for w in self._model.get_weights()]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        self._model.set_weights(self._check_weights(weights, self._shapes))

    def predict(self, x: np.ndarray) -> np.ndarray:
        inputs = self._check_inputs(x)
        parts = [
            np.asarray(self._model(inputs[i : i + _PREDICT_CHUNK], training=False))
            for i in range(0, len(inputs), _PREDICT_CHUNK)
        ]
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)

    def _make_step(self, config: TrainConfig, start: list[FloatArray]) -> _Step:
        tf = self._tf
        lr = tf.constant(config.learning_rate, tf.float32)
        mu = tf.constant(config.proximal_mu, tf.float32)
        anchor = [tf.constant(start[i]) for i in self._trainable_at]

        def step(x: FloatArray, y: npt.NDArray[np.int32]) -> float:
            try:
                loss = self._sgd_step(x, y, lr, mu, anchor)
            except tf.errors.OpError as exc:
                raise ModelError(f"training step failed: {exc}", reason="train_failed") from exc
            return float(loss)

        return step
