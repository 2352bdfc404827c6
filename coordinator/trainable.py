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
written with ops whose gradients are builtins, computing the same maths on the same weights:

- relu as ``maximum(0, x)`` (``ReluGrad`` is Flex);
- the first ``Conv2D`` as patches gathered through a constant index table from the zero-padded
  input, times the kernel reshaped to (kh * kw * cin, cout) inside the graph, so the stored
  variable keeps its Keras shape (``Conv2DBackpropFilter`` is Flex);
- ``MaxPooling2D`` as a reshape to (n, h/p, p, w/p, p, c) and a max over the pool axes
  (``MaxPoolGrad`` is Flex);
- the cross-entropy written out as logsumexp (shifted by a stop-gradient max) minus the
  picked logit (``SparseSoftmaxCrossEntropyWithLogits`` is Flex);
- a fixed batch in ``train`` (a dynamic one needs ``BroadcastGradientArgs``, Flex);
- weights exchanged through signatures, not checkpoints (``Save``/``Restore`` are Flex).

The converter runs with ``TFLITE_BUILTINS`` only, so a model that would need a Flex op fails
to export instead of failing later on a device. Supported layers: ``Conv2D`` (first layer
only; stride 1, no dilation, 'same' or 'valid'), ``MaxPooling2D`` (non-overlapping, sizes
that divide the input), ``Flatten`` and ``Dense``; activations linear and relu, and softmax on
the last layer, which must be a ``Dense`` with softmax. Anything else is a ``ModelError``.

TensorFlow is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from protocol.errors import ConfigError, ModelError

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
# How the converter names the TensorFlow ops it could only run through the Flex delegate.
_PLAIN_ACTIVATIONS: Final = frozenset({"linear", "relu"})

# One step of the forward graph: (tf module, variables, activations) -> activations.
_Step = Callable[[Any, Sequence[Any], Any], Any]


def import_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_MIN_LOG_LEVEL)
    import tensorflow as tf

    return tf


def _unsupported(layer: Any, why: str) -> ModelError:
    return ModelError(
        f"layer {layer.name!r} ({type(layer).__name__}) cannot train as builtin TFLite: {why}",
        reason="unsupported_model",
    )


def _activation_name(layer: Any) -> str:
    activation = getattr(layer, "activation", None)
    return str(getattr(activation, "__name__", "linear"))


def _activate(tf: Any, z: Any, name: str) -> Any:
    # ReluGrad is a Flex op; the gradient of maximum is made of builtins. Maximum sends the
    # gradient of a tie to its first argument, and ties are common (an all-zero input patch
    # with a zero bias): with 0 first, z == 0 gets gradient 0, as under Keras's relu.
    return tf.maximum(0.0, z) if name == "relu" else z


def _patch_table(
    in_shape: tuple[int, int, int], kernel: tuple[int, int], padded: tuple[int, int]
) -> npt.NDArray[np.int32]:
    """Gather indices into the flattened padded input, one row per output pixel.

    Row (r * out_w + s) lists ``padded[r + i, s + j, c]`` in (i, j, c) order: the C order of
    a Keras kernel (kh, kw, cin, cout), so the kernel reshapes to (kh * kw * cin, cout).
    """
    _, _, channels = in_shape
    kh, kw = kernel
    padded_h, padded_w = padded
    out_h, out_w = padded_h - kh + 1, padded_w - kw + 1
    rows, cols, ii, jj, cc = np.meshgrid(
        np.arange(out_h),
        np.arange(out_w),
        np.arange(kh),
        np.arange(kw),
        np.arange(channels),
        indexing="ij",
    )
    flat = ((rows + ii) * padded_w + (cols + jj)) * channels + cc
    return flat.reshape(out_h * out_w, kh * kw * channels).astype(np.int32)


class _Translator:
    """Walks a Keras ``Sequential`` and collects builtin-only forward steps.

    Tracks the static activation shape (without batch) and the index of each layer's first
    weight in ``get_weights()`` order.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.shape: tuple[int, ...] = tuple(int(d) for d in model.input_shape[1:])
        self.steps: list[_Step] = []
        self.next_weight = 0

    def run(self) -> list[_Step]:
        layers = list(self.model.layers)
        if type(self.model).__name__ != "Sequential" or not layers:
            raise ModelError(
                f"model {self.model.name!r} is not a Sequential model with layers",
                reason="unsupported_model",
            )
        handlers: dict[str, Callable[[Any, bool, bool], None]] = {
            "Conv2D": self._conv2d,
            "MaxPooling2D": self._max_pool,
            "Flatten": self._flatten,
            "Dense": self._dense,
        }
        for position, layer in enumerate(layers):
            handler = handlers.get(type(layer).__name__)
            if handler is None:
                raise _unsupported(layer, "this layer type is not supported")
            handler(layer, position == 0, position == len(layers) - 1)
        last = layers[-1]
        if type(last).__name__ != "Dense" or _activation_name(last) != "softmax":
            raise _unsupported(last, "the last layer must be a Dense layer with softmax")
        if self.next_weight != len(self.model.weights):
            raise ModelError(
                f"model {self.model.name!r} has weights outside its layers' kernels and biases",
                reason="unsupported_model",
            )
        return self.steps

    def _take_weights(self, layer: Any) -> tuple[int, int | None]:
        kernel = self.next_weight
        count = len(layer.weights)
        self.next_weight += count
        return kernel, (kernel + 1 if count == 2 else None)

    def _activation(self, layer: Any, *, last: bool) -> str:
        name = _activation_name(layer)
        if name in _PLAIN_ACTIVATIONS or (name == "softmax" and last):
            return name
        raise _unsupported(layer, f"activation {name!r} is not supported here")

    def _conv2d(self, layer: Any, first: bool, last: bool) -> None:
        # The patches trick needs no gradient with respect to the conv's input only when
        # that input is the model's input.
        if not first:
            raise _unsupported(layer, "Conv2D is supported as the first layer only")
        if tuple(layer.strides) != (1, 1) or tuple(layer.dilation_rate) != (1, 1):
            raise _unsupported(layer, "only stride 1 without dilation is supported")
        if layer.groups != 1 or layer.data_format != "channels_last":
            raise _unsupported(layer, "only ungrouped channels_last convolutions are supported")
        if layer.padding not in ("same", "valid"):
            raise _unsupported(layer, f"padding {layer.padding!r} is not supported")
        activation = self._activation(layer, last=last)
        height, width, channels = self.shape
        kh, kw = (int(k) for k in layer.kernel_size)
        # TensorFlow's 'same' at stride 1 pads k - 1 in total, the odd one bottom/right.
        top, left = ((kh - 1) // 2, (kw - 1) // 2) if layer.padding == "same" else (0, 0)
        bottom, right = ((kh - 1) - top, (kw - 1) - left) if layer.padding == "same" else (0, 0)
        padded = (height + top + bottom, width + left + right)
        table = _patch_table((height, width, channels), (kh, kw), padded)
        out_h, out_w = padded[0] - kh + 1, padded[1] - kw + 1
        patch = kh * kw * channels
        cout = int(layer.filters)
        flat_in = padded[0] * padded[1] * channels
        paddings = [[0, 0], [top, bottom], [left, right], [0, 0]]
        kernel_at, bias_at = self._take_weights(layer)

        def step(tf: Any, ws: Sequence[Any], x: Any) -> Any:
            flat = tf.reshape(tf.pad(x, paddings), [-1, flat_in])
            patches = tf.reshape(tf.gather(flat, table, axis=1), [-1, patch])
            # Reshaped here, not stored reshaped: the variable keeps the Keras kernel shape.
            z = tf.matmul(patches, tf.reshape(ws[kernel_at], [patch, cout]))
            if bias_at is not None:
                z = z + ws[bias_at]
            return _activate(tf, tf.reshape(z, [-1, out_h, out_w, cout]), activation)

        self.steps.append(step)
        self.shape = (out_h, out_w, cout)

    def _max_pool(self, layer: Any, first: bool, last: bool) -> None:
        del first, last
        pool = tuple(int(p) for p in layer.pool_size)
        strides = tuple(int(s) for s in (layer.strides or pool))
        if len(self.shape) != 3 or layer.data_format != "channels_last":
            raise _unsupported(layer, "only channels_last 2-D inputs are supported")
        height, width, channels = self.shape
        if strides != pool or height % pool[0] or width % pool[1]:
            raise _unsupported(layer, "only non-overlapping pools that divide the input fit")
        target = [-1, height // pool[0], pool[0], width // pool[1], pool[1], channels]

        def step(tf: Any, ws: Sequence[Any], x: Any) -> Any:
            del ws
            return tf.reduce_max(tf.reshape(x, target), axis=[2, 4])

        self.steps.append(step)
        self.shape = (height // pool[0], width // pool[1], channels)

    def _flatten(self, layer: Any, first: bool, last: bool) -> None:
        del layer, first, last
        size = int(np.prod(self.shape))

        def step(tf: Any, ws: Sequence[Any], x: Any) -> Any:
            del ws
            return tf.reshape(x, [-1, size])

        self.steps.append(step)
        self.shape = (size,)

    def _dense(self, layer: Any, first: bool, last: bool) -> None:
        del first
        if len(self.shape) != 1:
            raise _unsupported(layer, "Dense needs a flat input (add a Flatten before it)")
        activation = self._activation(layer, last=last)
        kernel_at, bias_at = self._take_weights(layer)

        def step(tf: Any, ws: Sequence[Any], x: Any) -> Any:
            z = tf.matmul(x, ws[kernel_at])
            if bias_at is not None:
                z = z + ws[bias_at]
            # The last layer's softmax is applied by `infer`; `train` works on the logits.
            return _activate(tf, z, activation)

        self.steps.append(step)
        self.shape = (int(layer.units),)


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
    steps = _Translator(model).run()
    initial = [np.asarray(w, dtype=np.float32) for w in model.get_weights()]
    num_classes = int(model.output_shape[-1])
    input_shape = [int(d) for d in model.input_shape[1:]]

    module = tf.Module(name=f"trainable_{model.name}")
    variables = [tf.Variable(w, name=f"w{i}") for i, w in enumerate(initial)]
    module.model_weights = variables

    def logits(x: Any) -> Any:
        for step in steps:
            x = step(tf, variables, x)
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
            loss = _cross_entropy(tf, logits(x), y, mask, num_classes)
        grads = tape.gradient(loss, variables)
        for variable, grad in zip(variables, grads, strict=True):
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
