"""Keras layers as builtin-only TFLite forward steps whose gradients are builtins too.

:class:`Translator` walks a model that is a chain of layers (a ``Sequential``, or a functional
model in which every layer feeds only the next) and gives one step per layer of
``model.layers``. What each layer becomes, and why (TensorFlow's own gradient of the obvious
op is a Flex op, found by converting each with ``TFLITE_BUILTINS`` only):

- ``Conv2D`` (any stride, 'same' or 'valid', no dilation, no groups): an explicit ``pad``
  then a 'VALID' ``conv2d`` with a custom gradient. TensorFlow's ``Conv2DBackpropInput``
  becomes the builtin ``TRANSPOSE_CONV``, but ``Conv2DBackpropFilter`` is Flex: the filter's
  gradient is written as a forward ``conv2d`` of the input (batch and channels swapped) with
  the upstream gradient as the filter, dilated by the stride (a builtin ``CONV_2D``).
- ``DepthwiseConv2D``: ``DepthwiseConv2dNativeBackprop{Input,Filter}`` are both Flex, so the
  builtin ``DEPTHWISE_CONV_2D`` gets a custom gradient made of depthwise convolutions too: the
  kernel's from the input with the batch folded into channels (dilated by the stride), the
  input's from the upstream gradient (zeros spread in for a stride) and the flipped kernel.
- ``MaxPooling2D`` / ``AveragePooling2D``: ``MaxPoolGrad`` and ``AvgPoolGrad`` are Flex.
  Non-overlapping windows are a reshape and a max (or sum) over the window axes; overlapping
  ones gather each window with a constant one-hot convolution first. 'valid' crops the
  remainder, 'same' pads (with the lowest float for max, with zeros for average, which then
  divides by the count of real pixels per window, as Keras does).
- ``GlobalAveragePooling2D`` / ``GlobalMaxPooling2D``: ``mean`` / ``max`` over the two spatial
  axes (their gradients are builtins).
- ``BatchNormalization``, frozen only (``trainable = False``): the inference-mode affine map
  from its moving statistics, ``(x - mean) * rsqrt(var + eps) * gamma + beta``, none of its
  weights updated (Keras runs a frozen BatchNormalization in inference mode too). A trainable
  one normalises by batch statistics, which a zero-padded fixed batch cannot reproduce.
- ``Dropout``: the identity in ``infer``; in ``train`` the inverted dropout Keras applies,
  ``x * (u >= rate) / (1 - rate)`` with ``u`` from the builtin ``RANDOM_UNIFORM`` (its own
  random stream, not Keras's, so masks differ from a Keras step's).
- ``Flatten``, ``Dense``, ``Activation`` and ``ReLU`` (plain); ``InputLayer`` is the identity.
- activations: linear; relu as ``maximum(0, x)`` (``ReluGrad`` is Flex); softmax only on
  the last layer, which ``train`` replaces by its cross-entropy on the logits.

Anything else raises a :class:`ModelError` (reason ``unsupported_model``) naming the layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from coordinator.trainable_ops import (
    PLAIN_ACTIVATIONS,
    activate,
    activation_name,
    conv,
    depthwise,
    real_counts,
    unsupported,
    window_copier,
    window_geometry,
)
from protocol.errors import ModelError

if TYPE_CHECKING:
    import keras

__all__ = ["Step", "Translator"]

_LOWEST: Final = float(np.finfo(np.float32).min)


class Step:
    """One layer's forward computation; ``training`` switches dropout on."""

    def __init__(self, run: Callable[[Any, Sequence[Any], Any, bool], Any]) -> None:
        self._run = run

    def __call__(self, tf: Any, ws: Sequence[Any], x: Any, training: bool = False) -> Any:
        return self._run(tf, ws, x, training)


class Translator:
    """Walks a chain of Keras layers and collects one builtin-only forward step per layer.

    Tracks the static activation shape (without batch) and the index of each layer's first
    weight in ``get_weights()`` order.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.shape: tuple[int, ...] = ()
        self.steps: list[Step] = []
        self.next_weight = 0

    def run(self) -> list[Step]:
        layers = list(self.model.layers)
        self._check_chain(layers)
        self.shape = tuple(int(d) for d in self.model.input_shape[1:])
        handlers: dict[str, Callable[[Any, bool], None]] = {
            "InputLayer": self._identity,
            "Conv2D": self._conv2d,
            "DepthwiseConv2D": self._depthwise,
            "MaxPooling2D": self._pool,
            "AveragePooling2D": self._pool,
            "GlobalAveragePooling2D": self._global_pool,
            "GlobalMaxPooling2D": self._global_pool,
            "BatchNormalization": self._batch_norm,
            "Dropout": self._dropout,
            "Flatten": self._flatten,
            "Dense": self._dense,
            "Activation": self._activation_layer,
            "ReLU": self._relu,
        }
        for position, layer in enumerate(layers):
            handler = handlers.get(type(layer).__name__)
            if handler is None:
                raise unsupported(layer, "this layer type is not supported")
            handler(layer, position == len(layers) - 1)
        if activation_name(layers[-1]) != "softmax":
            raise unsupported(layers[-1], "the last layer must end in softmax")
        if self.next_weight != len(self.model.weights):
            raise ModelError(
                f"model {self.model.name!r} has weights outside its layers' own weights",
                reason="unsupported_model",
            )
        return self.steps

    def _check_chain(self, layers: list[Any]) -> None:
        if not layers or type(self.model).__name__ not in ("Sequential", "Functional"):
            raise ModelError(
                f"model {self.model.name!r} is not a Sequential or functional model with layers",
                reason="unsupported_model",
            )
        if len(self.model.inputs) != 1 or len(self.model.outputs) != 1:
            raise ModelError(
                f"model {self.model.name!r} needs one input and one output",
                reason="unsupported_model",
            )
        if type(self.model).__name__ == "Functional":
            for before, layer in itertools.pairwise(layers):
                if len(layer._inbound_nodes) != 1 or layer.input is not before.output:
                    raise unsupported(
                        layer, f"it does not take exactly the output of {before.name!r}"
                    )

    def _take_weights(self, layer: Any) -> list[int]:
        first = self.next_weight
        self.next_weight += len(layer.weights)
        return list(range(first, self.next_weight))

    def _activation(self, layer: Any, *, last: bool) -> str:
        name = activation_name(layer)
        if name in PLAIN_ACTIVATIONS or (name == "softmax" and last):
            return name
        raise unsupported(layer, f"activation {name!r} is not supported here")

    def _add(self, run: Callable[[Any, Sequence[Any], Any, bool], Any]) -> None:
        self.steps.append(Step(run))

    def _image_shape(self, layer: Any) -> tuple[int, int, int]:
        if len(self.shape) != 3 or getattr(layer, "data_format", None) != "channels_last":
            raise unsupported(layer, "only channels_last 2-D images are supported")
        height, width, channels = self.shape
        return height, width, channels

    def _identity(self, layer: Any, last: bool) -> None:
        del layer, last
        self._add(lambda _tf, _ws, x, _training: x)

    def _conv_kernel_layer(self, layer: Any, last: bool) -> tuple[Any, ...]:
        """What Conv2D and DepthwiseConv2D share: geometry, activation and weight indices."""
        self._image_shape(layer)
        if tuple(layer.dilation_rate) != (1, 1):
            raise unsupported(layer, "dilated convolutions are not supported")
        window = (int(layer.kernel_size[0]), int(layer.kernel_size[1]))
        stride = (int(layer.strides[0]), int(layer.strides[1]))
        paddings, out = window_geometry(layer, self.shape, window, stride)  # type: ignore[arg-type]
        activation = self._activation(layer, last=last)
        indices = self._take_weights(layer)
        bias_at = indices[1] if layer.use_bias else None
        return window, stride, paddings, out, activation, indices[0], bias_at

    def _conv2d(self, layer: Any, last: bool) -> None:
        if layer.groups != 1:
            raise unsupported(layer, "grouped convolutions are not supported")
        _, stride, paddings, (out_h, out_w), activation, kernel_at, bias_at = (
            self._conv_kernel_layer(layer, last)
        )

        def run(tf: Any, ws: Sequence[Any], x: Any, training: bool) -> Any:
            del training
            z = conv(tf, tf.pad(x, paddings), ws[kernel_at], stride)
            if bias_at is not None:
                z = z + ws[bias_at]
            return activate(tf, z, activation)

        self._add(run)
        self.shape = (out_h, out_w, int(layer.filters))

    def _depthwise(self, layer: Any, last: bool) -> None:
        window, stride, paddings, (out_h, out_w), activation, kernel_at, bias_at = (
            self._conv_kernel_layer(layer, last)
        )
        del window
        channels = self.shape[2]
        multiplier = int(layer.depth_multiplier)

        def run(tf: Any, ws: Sequence[Any], x: Any, training: bool) -> Any:
            del training
            z = depthwise(tf, tf.pad(x, paddings), ws[kernel_at], stride)
            if bias_at is not None:
                z = z + ws[bias_at]
            return activate(tf, z, activation)

        self._add(run)
        self.shape = (out_h, out_w, channels * multiplier)

    def _pool(self, layer: Any, last: bool) -> None:
        del last
        height, width, channels = self._image_shape(layer)
        window = (int(layer.pool_size[0]), int(layer.pool_size[1]))
        stride = (int(layer.strides[0]), int(layer.strides[1]))
        paddings, (out_h, out_w) = window_geometry(layer, self.shape, window, stride)  # type: ignore[arg-type]
        is_max = type(layer).__name__ == "MaxPooling2D"
        fill = _LOWEST if is_max else 0.0
        # Only the rows and columns some window reads: 'valid' drops the remainder.
        used_h = (out_h - 1) * stride[0] + window[0]
        used_w = (out_w - 1) * stride[1] + window[1]
        kh, kw = window
        one_hot = window_copier(channels, window)
        # Keras averages over the real pixels of a window, never over padding.
        counts = None if is_max else real_counts((height, width), paddings, window, stride)

        def run(tf: Any, ws: Sequence[Any], x: Any, training: bool) -> Any:
            del ws, training
            # tf.slice, not indexing: StridedSliceGrad is Flex, Slice's gradient is a Pad.
            x = tf.slice(
                tf.pad(x, paddings, constant_values=fill), [0] * 4, [-1, used_h, used_w, -1]
            )
            if stride == window:
                x = tf.reshape(x, [-1, out_h, kh, out_w, kw, channels])
                axes = [2, 4]
            else:
                x = tf.reshape(
                    conv(tf, x, tf.constant(one_hot), stride),
                    [-1, out_h, out_w, channels, kh * kw],
                )
                axes = [4]
            if is_max:
                return tf.reduce_max(x, axis=axes)
            return tf.reduce_sum(x, axis=axes) / counts

        self._add(run)
        self.shape = (out_h, out_w, channels)

    def _global_pool(self, layer: Any, last: bool) -> None:
        del last
        _, _, channels = self._image_shape(layer)
        if layer.keepdims:
            raise unsupported(layer, "keepdims=True is not supported")
        is_max = type(layer).__name__ == "GlobalMaxPooling2D"

        def run(tf: Any, ws: Sequence[Any], x: Any, training: bool) -> Any:
            del ws, training
            return tf.reduce_max(x, axis=[1, 2]) if is_max else tf.reduce_mean(x, axis=[1, 2])

        self._add(run)
        self.shape = (channels,)

    def _batch_norm(self, layer: Any, last: bool) -> None:
        del last
        axis = layer.axis if isinstance(layer.axis, int) else None
        if axis not in (-1, len(self.shape)):
            raise unsupported(layer, "only normalisation over the last axis is supported")
        if layer.trainable:
            raise unsupported(
                layer,
                "a trainable BatchNormalization normalises by batch statistics; freeze it "
                "(layer.trainable = False) to train it as its inference-mode affine map",
            )
        indices = iter(self._take_weights(layer))
        gamma_at = next(indices) if layer.scale else None
        beta_at = next(indices) if layer.center else None
        mean_at, var_at = next(indices), next(indices)
        epsilon = float(layer.epsilon)

        def run(tf: Any, ws: Sequence[Any], x: Any, training: bool) -> Any:
            del training
            z = (x - ws[mean_at]) * tf.math.rsqrt(ws[var_at] + epsilon)
            if gamma_at is not None:
                z = z * ws[gamma_at]
            return z + ws[beta_at] if beta_at is not None else z

        self._add(run)

    def _dropout(self, layer: Any, last: bool) -> None:
        del last
        if layer.noise_shape is not None:
            raise unsupported(layer, "a noise_shape is not supported")
        rate = float(layer.rate)

        def run(tf: Any, ws: Sequence[Any], x: Any, training: bool) -> Any:
            del ws
            if not training or rate == 0.0:
                return x
            keep = tf.cast(tf.random.uniform(tf.shape(x)) >= rate, tf.float32)
            return x * keep / (1.0 - rate)

        self._add(run)

    def _flatten(self, layer: Any, last: bool) -> None:
        del layer, last
        size = int(np.prod(self.shape))
        self._add(lambda tf, _ws, x, _training: tf.reshape(x, [-1, size]))
        self.shape = (size,)

    def _dense(self, layer: Any, last: bool) -> None:
        if len(self.shape) != 1:
            raise unsupported(layer, "Dense needs a flat input (add a Flatten before it)")
        activation = self._activation(layer, last=last)
        indices = self._take_weights(layer)
        kernel_at, bias_at = indices[0], (indices[1] if layer.use_bias else None)

        def run(tf: Any, ws: Sequence[Any], x: Any, training: bool) -> Any:
            del training
            z = tf.matmul(x, ws[kernel_at])
            if bias_at is not None:
                z = z + ws[bias_at]
            # The last layer's softmax is applied by `infer`; `train` works on the logits.
            return activate(tf, z, activation)

        self._add(run)
        self.shape = (int(layer.units),)

    def _activation_layer(self, layer: Any, last: bool) -> None:
        activation = self._activation(layer, last=last)
        self._add(lambda tf, _ws, x, _training: activate(tf, x, activation))

    def _relu(self, layer: Any, last: bool) -> None:
        del last
        plain = layer.max_value is None and not layer.negative_slope and not layer.threshold
        if not plain:
            raise unsupported(layer, "only a plain ReLU (no max, slope or threshold) fits")
        self._add(lambda tf, _ws, x, _training: activate(tf, x, "relu"))
