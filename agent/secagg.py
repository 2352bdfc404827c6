"""One agent's side of one secure-aggregation round: a pure state machine, no I/O.

The agent makes two X25519 key pairs and a 32-byte self-mask seed per round; Shamir-shares
the seed and its mask private key with its neighbours (threshold ``t``), each share sealed
for its recipient; uploads its quantised update plus its self mask plus and minus the
pairwise masks of its neighbours that shared in time; and, asked to unmask, reveals for each
neighbour either the seed share (the neighbour uploaded) or the key share (it dropped),
never both for the same neighbour in one round, and nothing if fewer than ``t`` uploaded
(the sum of so few would say too much about each). With distributed DP the round's
parameters carry a noise std: the agent adds its discrete Gaussian share of the noise to
the quantised update before the masks (see :mod:`coordinator.distributed_dp`).
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from protocol.errors import ProtocolError
from protocol.messages.secagg import (
    AgentKeys,
    EncryptedShares,
    KeyDirectory,
    PeerKeys,
    RevealedShare,
    SealedShare,
    SecAggParams,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
    b64,
    unb64,
)
from protocol.secagg import (
    MODULUS,
    decrypt_share,
    discrete_gaussian,
    encrypt_share,
    mask_vector,
    neighbours,
    noise_steps,
    pair_sign,
    pairwise_seed,
    public_bytes,
    quantise,
    split_secret,
)

__all__ = ["SecAggClient", "private_bytes"]

SECRET_BYTES = 32
_SHARE = struct.Struct(">I32s32s")


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class SecAggClient:
    def __init__(self, *, agent: str, round_number: int, params: SecAggParams) -> None:
        self.agent = agent
        self.round = round_number
        self.params = params
        self._mask_key = X25519PrivateKey.generate()
        self._share_key = X25519PrivateKey.generate()
        self._seed = os.urandom(SECRET_BYTES)
        self._directory: dict[str, PeerKeys] = {}
        self._neighbours: tuple[str, ...] = ()
        self._held: dict[str, tuple[int, bytes, bytes]] = {}  # owner -> index, seed, key
        self._sharers: frozenset[str] | None = None
        self._revealed: dict[str, str] = {}  # owner -> "seed" | "key"

    def advertise(self) -> AgentKeys:
        return AgentKeys(
            round=self.round,
            keys=PeerKeys(
                agent=self.agent,
                mask_key=b64(public_bytes(self._mask_key)),
                share_key=b64(public_bytes(self._share_key)),
            ),
        )

    def on_directory(self, directory: KeyDirectory) -> EncryptedShares:
        self._check_round(directory.round)
        self._directory = {keys.agent: keys for keys in directory.keys}
        if self.agent not in self._directory:
            raise ProtocolError("this agent's keys are not in the directory", reason="secagg_late")
        self._neighbours = neighbours(list(self._directory), self.agent, self.params.degree)
        if len(self._neighbours) < self.params.threshold:
            raise ProtocolError(
                f"{len(self._neighbours)} neighbours, threshold {self.params.threshold}",
                reason="secagg_threshold",
            )
        count, threshold = len(self._neighbours), self.params.threshold
        seeds = split_secret(self._seed, threshold=threshold, count=count)
        keys = split_secret(private_bytes(self._mask_key), threshold=threshold, count=count)
        sealed = []
        for peer, (index, seed_share), (_, key_share) in zip(
            self._neighbours, seeds, keys, strict=True
        ):
            plaintext = _SHARE.pack(index, seed_share, key_share)
            ciphertext = encrypt_share(
                plaintext,
                private=self._share_key,
                peer_public=unb64(self._directory[peer].share_key),
                round_number=self.round,
                sender=self.agent,
                recipient=peer,
            )
            sealed.append(
                SealedShare(sender=self.agent, recipient=peer, ciphertext=b64(ciphertext))
            )
        return EncryptedShares(round=self.round, agent=self.agent, shares=tuple(sealed))

    def on_inbox(self, inbox: ShareInbox) -> None:
        self._check_round(inbox.round)
        if inbox.agent != self.agent or self.agent not in inbox.sharers:
            raise ProtocolError("an inbox for another agent", reason="secagg_bad_message")
        for sealed in inbox.shares:
            if sealed.recipient != self.agent or sealed.sender not in self._neighbours:
                raise ProtocolError(
                    f"a share from {sealed.sender} that is not for this agent",
                    reason="secagg_bad_share",
                )
            plaintext = decrypt_share(
                unb64(sealed.ciphertext),
                private=self._share_key,
                peer_public=unb64(self._directory[sealed.sender].share_key),
                round_number=self.round,
                sender=sealed.sender,
                recipient=self.agent,
            )
            if len(plaintext) != _SHARE.size:
                raise ProtocolError("a share of the wrong size", reason="secagg_bad_share")
            self._held[sealed.sender] = _SHARE.unpack(plaintext)
        self._sharers = frozenset(inbox.sharers)

    def masked(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """The upload: quantised values (+ DP noise) + self mask +- pairwise masks, mod 2^32."""
        if self._sharers is None:
            raise ProtocolError("masked upload before the share inbox", reason="secagg_order")
        params = self.params
        vector = quantise(values, clip=params.clip_range, levels=params.quantisation_levels)
        length = vector.size
        if params.dp_noise_stddev > 0.0:
            # This agent's share of the round's noise, in whole steps, from fresh OS entropy:
            # added before masking, so only the noisy sum is ever unmasked.
            sigma = noise_steps(
                params.dp_noise_stddev, clip=params.clip_range, levels=params.quantisation_levels
            )
            noise = discrete_gaussian(sigma, length, np.random.default_rng(secrets.randbits(128)))
            vector += (noise % MODULUS).astype(np.uint32)
        vector += mask_vector(self._seed, length)  # uint32 arithmetic wraps mod 2^32
        for peer in self._neighbours:
            if peer not in self._sharers:
                continue  # it dropped before sharing: nobody could remove its mask
            seed = pairwise_seed(self._mask_key, unb64(self._directory[peer].mask_key), self.round)
            if pair_sign(self.agent, peer) > 0:
                vector += mask_vector(seed, length)
            else:
                vector -= mask_vector(seed, length)
        return vector

    def on_unmask(self, request: UnmaskRequest) -> UnmaskShares:
        self._check_round(request.round)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ProtocolError(
                f"asked for both shares of {sorted(survivors & dropped)}",
                reason="secagg_both_shares",
            )
        if len(survivors) < self.params.threshold:
            raise ProtocolError(
                f"only {len(survivors)} uploads, threshold {self.params.threshold}: "
                "unmasking so few would expose them",
                reason="secagg_threshold",
            )
        wanted = dict.fromkeys(survivors, "seed") | dict.fromkeys(dropped, "key")
        for owner, kind in wanted.items():
            if owner in self._held and self._revealed.get(owner, kind) != kind:
                raise ProtocolError(
                    f"already revealed the {self._revealed[owner]} share of {owner}; "
                    f"refusing its {kind} share",
                    reason="secagg_both_shares",
                )
        seeds: list[RevealedShare] = []
        keys: list[RevealedShare] = []
        for owner, (index, seed_share, key_share) in sorted(self._held.items()):
            if owner not in wanted:
                continue
            kind = wanted[owner]
            self._revealed[owner] = kind
            chosen = seed_share if kind == "seed" else key_share
            revealed = RevealedShare(owner=owner, index=index, share=b64(chosen))
            (seeds if kind == "seed" else keys).append(revealed)
        return UnmaskShares(
            round=self.round, agent=self.agent, seed_shares=tuple(seeds), key_shares=tuple(keys)
        )

    def _check_round(self, number: int) -> None:
        if number != self.round:
            raise ProtocolError(
                f"a message of round {number} in round {self.round}", reason="stale_round"
            )
