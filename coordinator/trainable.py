"""Trainable ``.tflite`` models: SGD inside LiteRT, on a device without TensorFlow.

:func:`build_trainable_module` rewrites a small Keras ``Sequential`` into a ``tf.Module`` with
four signatures, and ``coordinator.trainable_export`` converts it with builtin ops only:

- ``infer(x)`` -> ``{"output": probabilities}``; any batch size.
- ``train(x, y, mask, lr)`` -> ``{"loss": ...}``: one SGD step ``w -= lr * grad`` on a fixed
  batch of ``batch_size`` examples. ``mask`` (float32, one per example, 1 or 0) marks the
  examples that count: the loss is the masked mean, so a short last batch zero-padded with
  mask 0 takes exactly the step Keras takes on the short batch.
- ``get_weights()`` -> ``{"w0": ..., "w1": ...}`` in Keras ``get_weights()`` order and shapes.
- ``set_weights(w0, w1, ...)`` assigns them all; returns ``{"count": number of arrays}``.

A device without the Flex delegate (no pip package ships it) can only run builtin ops, and
TensorFlow's gradients of several common ops are Flex ops. The forward graph is therefore
written with ops whose gradients are builtins, computing the same maths on the same weights
(:mod:`coordinator.trainable_layers` says how, layer by layer), and:

- the cross-entropy written out as logsumexp (shifted by a stop-gradient max) minus the
  picked logit (``SparseSoftmaxCrossEntropyWithLogits`` is Flex);
- a fixed batch in ``train`` (a dynamic one needs ``BroadcastGradientArgs``, Flex);
- weights exchanged through signatures, not checkpoints (``Save``/``Restore`` are Flex);
- only the weights Keras trains are stepped: non-trainable ones (a frozen layer's, a
  BatchNormalization's moving statistics) travel in ``get_weights`` but never change.

The converter runs with ``TFLITE_BUILTINS`` only, so a model that would need a Flex op fails
to export instead of failing later on a device. Anything the translator does not know is a
``ModelError`` (reason ``unsupported_model``) naming the layer and why.

TensorFlow is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from coordinator.trainable_layers import Translator
from protocol.errors import ConfigError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "TRAINABLE_SIGNATURES",
    "attach_weight_signatures",
    "build_trainable_module",
    "import_tf",
]

_log = logging.getLogger(__name__)

TRAINABLE_SIGNATURES: Final = ("infer", "train", "get_weights", "set_weights")
DEFAULT_BATCH_SIZE: Final = 16
# Hide TensorFlow's C++ INFO and WARNING lines; errors still print, and raise.
_TF_CPP_MIN_LOG_LEVEL = "2"
# The translator under its former name, for the split model.
_Translator = Translator


def import_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_MIN_LOG_LEVEL)
    import tensorflow as tf

    return tf


def _cross_entropy(tf: Any, logits: Any, y: Any, mask: Any, num_classes: int) -> Any:
    """Masked mean of -log softmax(logits)[y], from builtin ops only."""
    shift = tf.stop_gradient(tf.reduce_max(logits, axis=1, keepdims=True))
    log_sum_exp = tf.math.log(tf.reduce_sum(tf.exp(logits - shift), axis=1))
    log_sum_exp = log_sum_exp + tf.reshape(shift, [-1])
    picked = tf.reduce_sum(tf.one_hot(y, num_classes, dtype=tf.float32) * logits, axis=1)
    return tf.reduce_sum(mask * (log_sum_exp - picked)) / tf.maximum(tf.reduce_sum(mask), 1.0)


def build_trainable_module(
    model: keras.Model, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> tf.Module:
    """``model`` rewritten as a module with the four trainable signatures.

    The module owns plain ``tf.Variable`` copies of ``model.get_weights()`` (Keras 3 variables
    would lose their initial values in conversion); it does not share them with ``model``.
    """
    if batch_size < 1:
        raise ConfigError(
            f"batch_size must be at least 1, got {batch_size}", reason="bad_batch_size"
        )
    tf = import_tf()
    steps = Translator(model).run()
    # Keras steps only its trainable variables; get_weights() also holds the others.
    trainable = [bool(w.trainable) for w in model.weights]
    initial = [np.asarray(w, dtype=np.float32) for w in model.get_weights()]
    num_classes = int(model.output_shape[-1])
    input_shape = [int(d) for d in model.input_shape[1:]]

    module = tf.Module(name=f"trainable_{model.name}")
    variables = [tf.Variable(w, name=f"w{i}") for i, w in enumerate(initial)]
    module.model_weights = variables

    def logits(x: Any, *, training: bool = False) -> Any:
        for step in steps:
            x = step(tf, variables, x, training)
        return x

    x_spec = tf.TensorSpec([None, *input_shape], tf.float32, name="x")

    def infer(x: Any) -> dict[str, Any]:
        return {"output": tf.nn.softmax(logits(x))}

    train_specs = [
        tf.TensorSpec([batch_size, *input_shape], tf.float32, name="x"),
        tf.TensorSpec([batch_size], tf.int32, name="y"),
        tf.TensorSpec([batch_size], tf.float32, name="mask"),
        tf.TensorSpec([], tf.float32, name="lr"),
    ]

    def train(x: Any, y: Any, mask: Any, lr: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            loss = _cross_entropy(tf, logits(x, training=True), y, mask, num_classes)
        stepped = [v for v, t in zip(variables, trainable, strict=True) if t]
        for variable, grad in zip(stepped, tape.gradient(loss, stepped), strict=True):
            variable.assign_sub(lr * grad)
        return {"loss": loss}

    module.infer = tf.function(infer, input_signature=[x_spec])
    module.train = tf.function(train, input_signature=train_specs)
    attach_weight_signatures(tf, module, variables)
    return module


def attach_weight_signatures(tf: Any, module: Any, variables: Sequence[Any]) -> None:
    """Give ``module`` the ``get_weights()`` and ``set_weights(w0, ...)`` signatures."""

    def get_weights() -> dict[str, Any]:
        return {f"w{i}": tf.identity(v) for i, v in enumerate(variables)}

    weight_specs = [
        tf.TensorSpec(v.shape, tf.float32, name=f"w{i}") for i, v in enumerate(variables)
    ]

    def set_weights(*weights: Any) -> dict[str, Any]:
        for variable, value in zip(variables, weights, strict=True):
            variable.assign(value)
        return {"count": tf.constant(len(variables), tf.int32)}

    module.get_weights = tf.function(get_weights, input_signature=[])
    module.set_weights = tf.function(set_weights, input_signature=weight_specs)
