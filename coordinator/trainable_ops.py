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
