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

__all__ = ["decode_update", "decode_weights", "encode_update", "encode_weights"]

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


def _ordered(tensors: dict[str, npt.NDArray[np.float32]], prefix: str) -> FloatArrays:
    expected = [f"{prefix}{i}" for i in range(len(tensors))]
    if sorted(tensors) != sorted(expected):
        raise TensorCodecError(
            f"tensors must be named {prefix}0..{prefix}{len(tensors) - 1}, got {sorted(tensors)}",
            reason="wrong_names",
        )
    return [tensors[name] for name in expected]
