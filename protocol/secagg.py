"""Secure aggregation's arithmetic (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017).

Pure functions a non-Python agent must reproduce bit for bit:

- **Quantisation**: every coordinate clipped to ``[-clip, clip]`` and mapped to an integer in
  ``[0, levels]`` by rounding to nearest; the sum of ``n`` such vectors is exact mod 2^32 as
  long as ``n x levels < 2^32`` (:func:`check_overflow`). Dequantising the sum gives the
  true sum of the clipped coordinates within ``n x clip / levels`` per coordinate
  (:func:`error_bound`): each agent's rounding moves it by at most half a step. The sum is
  read centred (signed, two's complement around ``n x levels / 2``), so integer noise that
  goes below zero wraps and comes back.
- **Distributed DP noise**: an agent may add discrete Gaussian noise, in whole quantisation
  steps, to its quantised vector before masking (:func:`discrete_gaussian`, the sampler of
  Canonne, Kamath and Steinke 2020). The overflow check then keeps ``TAIL_STDDEVS`` standard
  deviations of the summed noise inside the ring too.
- **Masks**: a 32-byte seed expands to a uint32 vector with AES-256-CTR (zero nonce; every
  seed is used for one vector only). A pairwise seed is HKDF-SHA256 of the X25519 shared
  secret of two agents' mask keys, bound to the round; the agent with the smaller id adds
  the pairwise mask, the other subtracts it, so they cancel in the sum.
- **Shares**: Shamir over GF(2^128) (pycryptodome's ``Shamir``, the scheme Flower uses), a
  secret of 16-byte blocks shared block by block with the same indices; encrypted to the
  recipient with AES-256-GCM under an HKDF key of the two agents' share keys, with
  (round, sender, recipient) as associated data so a share cannot be replayed elsewhere.
- **Graph**: agents sorted by id on a ring; each has the ``degree`` nearest as neighbours
  (``degree // 2`` each side; everyone when ``degree >= n - 1``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.errors import ConfigError, ProtocolError

__all__ = [
    "MODULUS",
    "TAIL_STDDEVS",
    "U32",
    "check_overflow",
    "combine_secret",
    "decrypt_share",
    "dequantise_sum",
    "discrete_gaussian",
    "encrypt_share",
    "error_bound",
    "mask_vector",
    "neighbours",
    "noise_steps",
    "pair_sign",
    "pairwise_seed",
    "public_bytes",
    "quantise",
    "split_secret",
]

MODULUS = 2**32
U32 = npt.NDArray[np.uint32]
BLOCK_BYTES = 16
NONCE_BYTES = 12
_ZERO_NONCE = bytes(16)
# Summed noise past this many standard deviations would wrap around the ring: the chance per
# coordinate is about 1e-23. A wrap would cost accuracy, never privacy (it is post-processing).
TAIL_STDDEVS = 10.0


# --- quantisation --------------------------------------------------------------------------


def check_overflow(agents: int, levels: int, noise: float = 0.0) -> None:
    """Refuse a quantisation whose sum over ``agents`` could wrap around 2^32.

    ``noise`` is each agent's noise standard deviation in quantisation steps (0: none).
    """
    room = agents * levels + 2.0 * TAIL_STDDEVS * noise * agents**0.5
    if levels < 1 or room >= MODULUS:
        raise ConfigError(
            f"secure aggregation: {agents} agents x {levels} quantisation levels"
            f"{' plus their noise' if noise else ''} do not fit in 2^32; lower "
            f"secagg_quantisation_levels below {MODULUS // max(agents, 1)}",
            reason="secagg_overflow",
        )


def noise_steps(noise_stddev: float, *, clip: float, levels: int) -> float:
    """A noise standard deviation in the update's units, in quantisation steps."""
    return noise_stddev * levels / (2.0 * clip)


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """``size`` draws of the discrete Gaussian N_Z(0, sigma^2) (Canonne, Kamath, Steinke 2020).

    Their Algorithm 3, vectorised: propose from the discrete Laplace of scale
    ``floor(sigma) + 1`` (a difference of two geometric draws) and accept with probability
    ``exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``; about half the proposals are kept.
    """
    if not sigma > 0.0:
        raise ConfigError(f"noise sigma must be positive, got {sigma}", reason="bad_dp")
    scale = float(np.floor(sigma)) + 1.0
    p = -float(np.expm1(-1.0 / scale))  # P(stop) of each geometric: 1 - exp(-1/t)
    out = np.empty(size, np.int64)
    todo = np.arange(size)
    while todo.size:
        n = todo.size
        proposal = rng.geometric(p, n) - rng.geometric(p, n)
        keep = rng.random(n) < np.exp(
            -((np.abs(proposal) - sigma**2 / scale) ** 2) / (2.0 * sigma**2)
        )
        out[todo[keep]] = proposal[keep]
        todo = todo[~keep]
    return out


def quantise(values: npt.ArrayLike, *, clip: float, levels: int) -> U32:
    """Flat float values -> integers in [0, levels], after clipping to [-clip, clip]."""
    flat = np.clip(np.asarray(values, np.float64).ravel(), -clip, clip)
    scaled = np.rint((flat + clip) * (levels / (2.0 * clip)))
    return scaled.astype(np.uint32)


def dequantise_sum(total: U32, *, agents: int, clip: float, levels: int) -> npt.NDArray[np.float64]:
    """The float sum of ``agents`` quantised vectors (plus any integer noise) from their sum.

    The sum is centred on ``agents x levels / 2`` and read as a signed 32-bit integer, so
    noise that took it below zero (or above 2^32) wrapped and is read back exactly.
    """
    offset = agents * levels
    centred = (np.asarray(total, np.int64) - offset // 2) % MODULUS
    signed = np.where(centred >= MODULUS // 2, centred - MODULUS, centred)
    return (signed.astype(np.float64) - (offset % 2) / 2.0) * (2.0 * clip / levels)


def error_bound(*, agents: int, clip: float, levels: int) -> float:
    """Largest error per coordinate of :func:`dequantise_sum` against the clipped sum."""
    return agents * clip / levels


# --- masks ---------------------------------------------------------------------------------


def mask_vector(seed: bytes, length: int) -> U32:
    """``length`` uint32 words of AES-256-CTR keystream under ``seed`` (32 bytes)."""
    if len(seed) != 32:
        raise ProtocolError("a mask seed is 32 bytes", reason="secagg_bad_seed")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def _derive(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


def _exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ProtocolError(f"bad X25519 public key: {exc}", reason="secagg_bad_key") from exc


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pairwise_seed(private: X25519PrivateKey, peer_public: bytes, round_number: int) -> bytes:
    """The seed two agents share for their pairwise mask in ``round_number``."""
    return _derive(_exchange(private, peer_public), f"fedge secagg mask r{round_number}")


def pair_sign(agent: str, peer: str) -> int:
    """+1 for the agent with the smaller id, -1 for the other: the masks cancel."""
    return 1 if agent < peer else -1


def neighbours(agents: Sequence[str], agent: str, degree: int) -> tuple[str, ...]:
    """``agent``'s neighbours on the ring of ``agents`` (sorted by id), itself excluded."""
    ring = sorted(agents)
    n = len(ring)
    if degree >= n - 1:
        return tuple(a for a in ring if a != agent)
    position = ring.index(agent)
    half = max(1, degree // 2)
    chosen = {ring[(position + step) % n] for step in range(-half, half + 1) if step}
    return tuple(sorted(chosen))


# --- shares --------------------------------------------------------------------------------


def split_secret(secret: bytes, *, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """Shamir shares (index 1..count) of ``secret`` (a multiple of 16 bytes)."""
    if len(secret) % BLOCK_BYTES or not secret:
        raise ConfigError("a shared secret is whole 16-byte blocks", reason="secagg_bad_secret")
    if not 1 <= threshold <= count:
        raise ConfigError(
            f"threshold {threshold} must be between 1 and {count}", reason="secagg_threshold"
        )
    blocks = [secret[i : i + BLOCK_BYTES] for i in range(0, len(secret), BLOCK_BYTES)]
    per_block = [Shamir.split(threshold, count, block) for block in blocks]
    return [
        (index + 1, b"".join(shares[index][1] for shares in per_block)) for index in range(count)
    ]


def combine_secret(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The secret back from at least ``threshold`` shares (fewer give garbage, not an error)."""
    length = len(shares[0][1])
    if length % BLOCK_BYTES or any(len(s) != length for _, s in shares):
        raise ProtocolError("shares of different lengths", reason="secagg_bad_share")
    blocks = [
        Shamir.combine([(i, s[offset : offset + BLOCK_BYTES]) for i, s in shares])
        for offset in range(0, length, BLOCK_BYTES)
    ]
    return b"".join(blocks)


def _share_key(private: X25519PrivateKey, peer_public: bytes, round_number: int) -> bytes:
    return _derive(_exchange(private, peer_public), f"fedge secagg shares r{round_number}")


def _aad(round_number: int, sender: str, recipient: str) -> bytes:
    return f"{round_number}|{sender}|{recipient}".encode()


def encrypt_share(
    plaintext: bytes,
    *,
    private: X25519PrivateKey,
    peer_public: bytes,
    round_number: int,
    sender: str,
    recipient: str,
) -> bytes:
    """nonce || AES-GCM(plaintext), readable only by ``recipient`` in this round."""
    key = _share_key(private, peer_public, round_number)
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext, _aad(round_number, sender, recipient))
    return nonce + sealed


def decrypt_share(
    ciphertext: bytes,
    *,
    private: X25519PrivateKey,
    peer_public: bytes,
    round_number: int,
    sender: str,
    recipient: str,
) -> bytes:
    key = _share_key(private, peer_public, round_number)
    try:
        return AESGCM(key).decrypt(
            ciphertext[:NONCE_BYTES],
            ciphertext[NONCE_BYTES:],
            _aad(round_number, sender, recipient),
        )
    except (InvalidTag, ValueError) as exc:
        raise ProtocolError(
            f"share from {sender} does not decrypt", reason="secagg_bad_share"
        ) from exc
