"""The builtin-only maths under :mod:`coordinator.trainable_layers`: convolution, windows.

Each function builds TensorFlow ops whose gradients convert to TFLite builtins; why each is
written so is in :mod:`coordinator.trainable_layers`'s docstring.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from protocol.errors import ModelError

__all__ = [
    "PLAIN_ACTIVATIONS",
    "activate",
    "activation_name",
    "conv",
    "depthwise",
    "real_counts",
    "unsupported",
    "window_copier",
    "window_geometry",
]

PLAIN_ACTIVATIONS: Final = frozenset({"linear", "relu"})


def unsupported(layer: Any, why: str) -> ModelError:
    return ModelError(
        f"layer {layer.name!r} ({type(layer).__name__}) cannot train as builtin TFLite: {why}",
        reason="unsupported_model",
    )


def activation_name(layer: Any) -> str:
    activation = getattr(layer, "activation", None)
    return str(getattr(activation, "__name__", "linear"))


def activate(tf: Any, z: Any, name: str) -> Any:
    # ReluGrad is a Flex op; the gradient of maximum is made of builtins. Maximum sends the
    # gradient of a tie to its first argument, and ties are common (an all-zero input patch
    # with a zero bias): with 0 first, z == 0 gets gradient 0, as under Keras's relu.
    return tf.maximum(0.0, z) if name == "relu" else z


def conv(tf: Any, x: Any, kernel: Any, stride: tuple[int, int]) -> Any:
    """'VALID' ``conv2d`` whose gradients are builtin TFLite ops (the filter's as a conv)."""

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def convolve(x: Any, kernel: Any) -> Any:
        def grad(upstream: Any) -> tuple[Any, Any]:
            kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
            d_x = tf.nn.conv2d_transpose(upstream, kernel, tf.shape(x), stride, "VALID")
            # d_kernel[i, j, ci, co] = sum over n, r, s of x[n, r*st + i, s*st + j, ci] *
            # upstream[n, r, s, co]: a convolution over (r, s) with the batch as channels.
            x_t = tf.transpose(x, [3, 1, 2, 0])
            up_t = tf.transpose(upstream, [1, 2, 0, 3])
            d_k = tf.nn.conv2d(x_t, up_t, 1, "VALID", dilations=list(stride))
            return d_x, tf.transpose(d_k[:, :kh, :kw, :], [1, 2, 0, 3])

        return tf.nn.conv2d(x, kernel, stride, "VALID"), grad

    return convolve(x, kernel)


def same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding of one axis: the odd pixel goes to the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def window_geometry(
    layer: Any, shape: tuple[int, int, int], window: tuple[int, int], stride: tuple[int, int]
) -> tuple[list[list[int]], tuple[int, int]]:
    """Paddings (as ``tf.pad`` takes them) and the output (h, w) of a windowed layer."""
    height, width, _ = shape
    if layer.padding == "same":
        top, bottom = same_padding(height, window[0], stride[0])
        left, right = same_padding(width, window[1], stride[1])
    elif layer.padding == "valid":
        top = bottom = left = right = 0
    else:
        raise unsupported(layer, f"padding {layer.padding!r} is not supported")
    out_h = (height + top + bottom - window[0]) // stride[0] + 1
    out_w = (width + left + right - window[1]) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise unsupported(layer, f"its window does not fit the input {shape}")
    return [[0, 0], [top, bottom], [left, right], [0, 0]], (out_h, out_w)


def window_copier(channels: int, window: tuple[int, int]) -> npt.NDArray[np.float32]:
    """A one-hot conv kernel that copies each window's pixels into channels (c, i, j)."""
    kh, kw = window
    one_hot = np.zeros((kh, kw, channels, channels * kh * kw), np.float32)
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                one_hot[i, j, c, (c * kh + i) * kw + j] = 1.0
    return one_hot


def real_counts(
    size: tuple[int, int],
    paddings: list[list[int]],
    window: tuple[int, int],
    stride: tuple[int, int],
) -> npt.NDArray[np.float32]:
    """How many input (not padding) pixels each pooling window covers, as (h, w, 1)."""
    kh, kw = window
    real = np.pad(np.ones(size, np.float32), paddings[1:3])
    out_h = (real.shape[0] - kh) // stride[0] + 1
    out_w = (real.shape[1] - kw) // stride[1] + 1
    rows = [r * stride[0] for r in range(out_h)]
    cols = [c * stride[1] for c in range(out_w)]
    counts = [[real[r : r + kh, c : c + kw].sum() for c in cols] for r in rows]
    return np.array(counts, np.float32).reshape(out_h, out_w, 1)


def _spread(tf: Any, g: Any, stride: int, axis: int) -> Any:
    """``stride - 1`` zeros after each entry along ``axis`` (1 or 2), the last ones cut."""
    if stride == 1:
        return g
    spread = tf.stack([g] + [tf.zeros_like(g)] * (stride - 1), axis=axis + 1)
    shape = tf.shape(g)
    if axis == 1:
        target = [shape[0], shape[1] * stride, shape[2], shape[3]]
        size = [-1, (g.shape[1] - 1) * stride + 1, -1, -1]
    else:
        target = [shape[0], shape[1], shape[2] * stride, shape[3]]
        size = [-1, -1, (g.shape[2] - 1) * stride + 1, -1]
    return tf.slice(tf.reshape(spread, target), [0, 0, 0, 0], size)


def depthwise(tf: Any, x: Any, kernel: Any, stride: tuple[int, int]) -> Any:
    """'VALID' ``depthwise_conv2d`` whose gradients are builtin TFLite ops.

    Both of TensorFlow's depthwise backprops are Flex. The kernel's gradient is a depthwise
    convolution of the input (batch folded into channels) with the upstream gradient as the
    kernel, dilated by the stride; the input's is a depthwise convolution of the upstream
    gradient (zeros between its entries for a stride, padded) with the flipped kernel.
    """

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def convolve(x: Any, kernel: Any) -> Any:
        def grad(upstream: Any) -> tuple[Any, Any]:
            kh, kw, channels, multiplier = (int(d) for d in kernel.shape)
            height, width = int(x.shape[1]), int(x.shape[2])
            out_h, out_w = int(upstream.shape[1]), int(upstream.shape[2])
            # d_kernel[i, j, c, m] = sum over n, r, s of x[n, r*st + i, s*st + j, c] *
            # upstream[n, r, s, c*M + m]: channels (c, n) of one image, kernel (r, s, (c, n), m).
            folded = tf.reshape(tf.transpose(x, [1, 2, 3, 0]), [1, height, width, -1])
            up = tf.reshape(upstream, [-1, out_h, out_w, channels, multiplier])
            up_kernel = tf.reshape(
                tf.transpose(up, [1, 2, 3, 0, 4]), [out_h, out_w, -1, multiplier]
            )
            d_k = tf.nn.depthwise_conv2d(
                folded, up_kernel, [1, 1, 1, 1], "VALID", dilations=list(stride)
            )
            d_k = tf.reshape(d_k[:, :kh, :kw, :], [kh, kw, channels, -1, multiplier])
            d_k = tf.reduce_sum(d_k, axis=3)
            # d_x: the full correlation of the spread gradient with the flipped kernel.
            spread = _spread(tf, _spread(tf, upstream, stride[0], 1), stride[1], 2)
            extra_h = height - ((out_h - 1) * stride[0] + kh)
            extra_w = width - ((out_w - 1) * stride[1] + kw)
            padded = tf.pad(
                spread, [[0, 0], [kh - 1, kh - 1 + extra_h], [kw - 1, kw - 1 + extra_w], [0, 0]]
            )
            flipped = tf.reshape(tf.reverse(kernel, [0, 1]), [kh, kw, channels * multiplier, 1])
            d_x = tf.nn.depthwise_conv2d(padded, flipped, [1, 1, 1, 1], "VALID")
            d_x = tf.reduce_sum(tf.reshape(d_x, [-1, height, width, channels, multiplier]), 4)
            return d_x, d_k

        strides = [1, stride[0], stride[1], 1]
        return tf.nn.depthwise_conv2d(x, kernel, strides, "VALID"), grad

    return convolve(x, kernel)
