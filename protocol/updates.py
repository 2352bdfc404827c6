"""Model weights and training updates as tensor blobs, named by position.

Weights travel as ``w0..wN`` in the model's own order; an update is the change an agent
made, ``d0..dN`` = local weights minus the round's weights, so that int8 and float16
encodings spend their precision on the change, not on the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from protocol.errors import TensorCodecError
from protocol.tensors import Encoding, decode_tensors, encode_tensors

__all__ = [
    "clip_update",
    "decode_update",
    "decode_weights",
    "delta_norm",
    "encode_update",
    "encode_weights",
]

WEIGHT_PREFIX = "w"
UPDATE_PREFIX = "d"

FloatArrays = list[npt.NDArray[np.float32]]


def encode_weights(weights: Sequence[npt.ArrayLike]) -> bytes:
    return encode_tensors({f"{WEIGHT_PREFIX}{i}": w for i, w in enumerate(weights)})


def decode_weights(data: bytes) -> FloatArrays:
    return _ordered(decode_tensors(data), WEIGHT_PREFIX)


def encode_update(deltas: Sequence[npt.ArrayLike], *, encoding: Encoding) -> bytes:
    return encode_tensors(
        {f"{UPDATE_PREFIX}{i}": d for i, d in enumerate(deltas)}, encoding=encoding
    )


def decode_update(data: bytes) -> FloatArrays:
    return _ordered(decode_tensors(data), UPDATE_PREFIX)


def delta_norm(deltas: Sequence[npt.ArrayLike]) -> float:
    """The L2 norm of an update over all its tensors at once, in float64."""
    return float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in deltas)))


def clip_update(deltas: Sequence[npt.ArrayLike], max_norm: float) -> tuple[FloatArrays, float]:
    """``deltas`` scaled down to L2 norm at most ``max_norm`` (as float32), and their norm.

    The bound holds on the float32 result, not just on the float64 maths: DP-FedAvg's
    sensitivity argument needs every clipped update's norm to be at most ``max_norm``.
    """
    arrays = [np.asarray(d, dtype=np.float32) for d in deltas]
    norm = delta_norm(arrays)
    if not norm > max_norm:  # also true for nan: the caller's validation refuses those
        return arrays, norm
    scale = max_norm / norm
    while True:
        clipped = [(np.asarray(a, np.float64) * scale).astype(np.float32) for a in arrays]
        if delta_norm(clipped) <= max_norm:
            return clipped, norm
        scale *= 1.0 - 2.0**-20  # float32 rounding pushed it just over: shrink a hair


def _ordered(tensors: dict[str, npt.NDArray[np.float32]], prefix: str) -> FloatArrays:
    expected = [f"{prefix}{i}" for i in range(len(tensors))]
    if sorted(tensors) != sorted(expected):
        raise TensorCodecError(
            f"tensors must be named {prefix}0..{prefix}{len(tensors) - 1}, got {sorted(tensors)}",
            reason="wrong_names",
        )
    return [tensors[name] for name in expected]
