"""Pruning masks: which weights a release keeps, and updates that carry only those.

A pruned release carries one mask per weight tensor (``m0..mN``, the model's order; 1 keeps
a weight, 0 pruned it), int8-encoded so a mask costs a byte per weight and its blob changes
only when the mask does. Agents hold pruned weights at zero, so their change is zero too:
an update sends a pruned tensor as the 1-D array of its kept entries (in C order) and the
coordinator scatters it back. Unpruned tensors (biases, and any tensor fully kept) travel
whole, so an update against a release without a mask is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from protocol.errors import TensorCodecError
from protocol.tensors import Encoding, decode_tensors, encode_tensors

__all__ = [
    "MASK_CONTENT_TYPE",
    "Masks",
    "decode_masks",
    "encode_masks",
    "pack_update",
    "sparsity",
    "unpack_update",
]

MASK_CONTENT_TYPE = "application/vnd.fedge.mask"
_PREFIX = "m"

Masks = list[npt.NDArray[np.bool_]]


def encode_masks(masks: Sequence[npt.ArrayLike]) -> bytes:
    return encode_tensors(
        {f"{_PREFIX}{i}": np.asarray(m, np.float32) for i, m in enumerate(masks)},
        encoding=Encoding.INT8,
    )


def decode_masks(data: bytes) -> Masks:
    tensors = decode_tensors(data)
    expected = [f"{_PREFIX}{i}" for i in range(len(tensors))]
    if sorted(tensors) != sorted(expected):
        raise TensorCodecError(
            f"masks must be named {_PREFIX}0..{_PREFIX}{len(tensors) - 1}, got {sorted(tensors)}",
            reason="wrong_names",
        )
    return [tensors[name] > 0.5 for name in expected]


def sparsity(weights: Sequence[npt.ArrayLike]) -> float:
    """Fraction of all the model's values that are exactly zero."""
    arrays = [np.asarray(w) for w in weights]
    total = sum(a.size for a in arrays)
    return sum(int(np.count_nonzero(a == 0)) for a in arrays) / max(1, total)


def pack_update(deltas: Sequence[npt.ArrayLike], masks: Masks) -> list[npt.NDArray[np.float32]]:
    """``deltas`` with every partly pruned tensor cut to its kept entries."""
    _check_count(deltas, masks)
    out = []
    for delta, mask in zip(deltas, masks, strict=True):
        array = np.asarray(delta, np.float32)
        out.append(array if mask.all() else array[mask])
    return out


def unpack_update(deltas: Sequence[npt.ArrayLike], masks: Masks) -> list[npt.NDArray[np.float32]]:
    """The inverse of :func:`pack_update`: zeros where the mask pruned.

    A tensor that is not a packed one (its shape already the mask's, or not the kept count)
    is passed on as it is, for the caller's shape checks to refuse.
    """
    _check_count(deltas, masks)
    out = []
    for delta, mask in zip(deltas, masks, strict=True):
        array = np.asarray(delta, np.float32)
        if array.shape != mask.shape and array.ndim == 1 and array.size == int(mask.sum()):
            full = np.zeros(mask.shape, np.float32)
            full[mask] = array
            array = full
        out.append(array)
    return out


def _check_count(deltas: Sequence[npt.ArrayLike], masks: Masks) -> None:
    if len(deltas) != len(masks):
        raise TensorCodecError(
            f"update has {len(deltas)} tensors, the mask {len(masks)}", reason="wrong_count"
        )
