"""Secure aggregation's arithmetic: quantisation bounds, masks, Shamir shares, sealing."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.errors import ConfigError, ProtocolError
from protocol.secagg import (
    check_overflow,
    combine_secret,
    decrypt_share,
    dequantise_sum,
    encrypt_share,
    error_bound,
    mask_vector,
    neighbours,
    pairwise_seed,
    public_bytes,
    quantise,
    split_secret,
)


@settings(max_examples=100, deadline=None)
@given(
    values=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 40)),
        elements=st.floats(-3.0, 3.0),
    ),
    clip=st.floats(0.1, 4.0),
    levels=st.sampled_from([2**8, 2**16, 2**20, 2**24]),
)
def test_the_dequantised_sum_is_within_the_stated_bound(
    values: np.ndarray, clip: float, levels: int
) -> None:
    agents = values.shape[0]
    total = np.zeros(values.shape[1], np.uint32)
    for row in values:
        total += quantise(row, clip=clip, levels=levels)
    got = dequantise_sum(total, agents=agents, clip=clip, levels=levels)
    want = np.clip(values, -clip, clip).sum(axis=0)
    bound = error_bound(agents=agents, clip=clip, levels=levels)
    assert np.max(np.abs(got - want)) <= bound * (1 + 1e-9) + 1e-12


def test_overflow_is_checked_for_the_number_of_agents() -> None:
    check_overflow(4095, 2**20)
    with pytest.raises(ConfigError) as caught:
        check_overflow(4096, 2**20)
    assert caught.value.reason == "secagg_overflow"


def test_masks_are_deterministic_per_seed_and_pairwise_seeds_agree() -> None:
    seed = bytes(range(32))
    np.testing.assert_array_equal(mask_vector(seed, 1000), mask_vector(seed, 1000))
    assert not np.array_equal(mask_vector(seed, 10), mask_vector(bytes(32), 10))
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    assert pairwise_seed(a, public_bytes(b), 3) == pairwise_seed(b, public_bytes(a), 3)
    assert pairwise_seed(a, public_bytes(b), 3) != pairwise_seed(a, public_bytes(b), 4)


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    count=st.integers(2, 12),
    data=st.data(),
)
def test_any_threshold_of_shares_rebuilds_the_secret(
    secret: bytes, count: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(1, count))
    shares = split_secret(secret, threshold=threshold, count=count)
    chosen = data.draw(st.permutations(shares))[:threshold]
    assert combine_secret(chosen) == secret
    if threshold > 1:
        assert combine_secret(chosen[: threshold - 1]) != secret


def test_sealed_shares_open_only_for_their_recipient_round_and_sender() -> None:
    alice, bob, eve = (X25519PrivateKey.generate() for _ in range(3))
    sealed = encrypt_share(
        b"share",
        private=alice,
        peer_public=public_bytes(bob),
        round_number=1,
        sender="a",
        recipient="b",
    )
    opened = decrypt_share(
        sealed,
        private=bob,
        peer_public=public_bytes(alice),
        round_number=1,
        sender="a",
        recipient="b",
    )
    assert opened == b"share"
    for private, number, sender in ((eve, 1, "a"), (bob, 2, "a"), (bob, 1, "c")):
        with pytest.raises(ProtocolError):
            decrypt_share(
                sealed,
                private=private,
                peer_public=public_bytes(alice),
                round_number=number,
                sender=sender,
                recipient="b",
            )


def test_the_ring_graph_is_symmetric_with_the_given_degree() -> None:
    agents = [f"a{i:02d}" for i in range(10)]
    for degree in (2, 4, 6):
        for agent in agents:
            mine = neighbours(agents, agent, degree)
            assert len(mine) == degree
            assert agent not in mine
            for peer in mine:
                assert agent in neighbours(agents, peer, degree)
    assert neighbours(agents[:4], "a00", 6) == ("a01", "a02", "a03")
