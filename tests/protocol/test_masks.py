"""Pruning masks and updates that carry only the kept entries."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import FedgeError, TensorCodecError
from protocol.masks import decode_masks, encode_masks, pack_update, sparsity, unpack_update


def _masks(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.random((3, 3, 1, 4)) > 0.6, np.ones(4, bool), rng.random((16, 5)) > 0.75]


def test_masks_round_trip_at_a_byte_per_weight() -> None:
    masks = _masks(np.random.default_rng(0))
    data = encode_masks(masks)
    back = decode_masks(data)
    assert all(np.array_equal(a, b) for a, b in zip(masks, back, strict=True))
    assert len(data) < 36 + 4 + 80 + 600  # a byte a value, plus the safetensors header


def test_an_update_sends_only_kept_entries_and_unpacks_with_zeros() -> None:
    rng = np.random.default_rng(1)
    masks = _masks(rng)
    deltas = [rng.normal(size=m.shape).astype(np.float32) * m for m in masks]
    packed = pack_update(deltas, masks)
    assert [p.size for p in packed] == [int(m.sum()) for m in masks[:1]] + [4, int(masks[2].sum())]
    assert packed[1].shape == (4,)  # a fully kept tensor travels whole
    unpacked = unpack_update(packed, masks)
    assert all(np.array_equal(a, b) for a, b in zip(deltas, unpacked, strict=True))


def test_an_unpacked_tensor_of_the_wrong_size_is_left_for_the_shape_check() -> None:
    masks = _masks(np.random.default_rng(2))
    wrong = [np.zeros(7, np.float32), np.zeros(4, np.float32), np.zeros((16, 5), np.float32)]
    out = unpack_update(wrong, masks)
    assert out[0].shape == (7,)
    with pytest.raises(TensorCodecError, match="2 tensors"):
        unpack_update(wrong[:2], masks)


def test_sparsity_counts_exact_zeros_over_all_values() -> None:
    assert sparsity([np.array([0.0, 1.0]), np.zeros((2, 3))]) == 7 / 8


@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_mask_decoder(data: bytes) -> None:
    with contextlib.suppress(FedgeError):
        decode_masks(data)
