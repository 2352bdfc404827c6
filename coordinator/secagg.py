"""The coordinator's side of one secure-aggregation round: a relay and an unmasker, no I/O.

It sees public keys, sealed shares it cannot open, masked uploads, and, at the end, the
self-mask seeds of the agents that uploaded and the mask keys of those that dropped after
sharing: exactly what removes the masks from the *sum*. Every stage keeps the first message
of each sender (QoS 1 may deliver twice) and refuses senders that did not reach the stage.
A stage with fewer than ``threshold`` agents fails the round with a :class:`SecAggFailedError`
whose message says which stage and how many were missing.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.errors import FedgeError, ProtocolError
from protocol.messages.secagg import (
    AgentKeys,
    EncryptedShares,
    KeyDirectory,
    PeerKeys,
    SealedShare,
    SecAggParams,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
    unb64,
)
from protocol.secagg import (
    U32,
    check_overflow,
    combine_secret,
    dequantise_sum,
    mask_vector,
    neighbours,
    noise_steps,
    pair_sign,
    pairwise_seed,
)

__all__ = ["SecAggFailedError", "SecAggServer"]


class SecAggFailedError(FedgeError):
    """The round cannot be unmasked: too few agents at some stage."""

    default_reason = "secagg_below_threshold"


class SecAggServer:
    def __init__(
        self, *, round_number: int, params: SecAggParams, selected: tuple[str, ...], length: int
    ) -> None:
        steps = noise_steps(
            params.dp_noise_stddev, clip=params.clip_range, levels=params.quantisation_levels
        )
        check_overflow(len(selected), params.quantisation_levels, steps)
        self.round = round_number
        self.params = params
        self.selected = frozenset(selected)
        self.length = length
        self.keys: dict[str, PeerKeys] = {}
        self._sealed: dict[str, tuple[SealedShare, ...]] = {}
        self._sum: U32 = np.zeros(length, np.uint32)
        self.uploaded: set[str] = set()
        self._revealed: set[str] = set()
        self._seed_shares: dict[str, dict[int, bytes]] = defaultdict(dict)
        self._key_shares: dict[str, dict[int, bytes]] = defaultdict(dict)
        self._request: UnmaskRequest | None = None

    # stage 1: keys
    def add_keys(self, message: AgentKeys) -> bool:
        agent = message.keys.agent
        self._expect(message.round, agent, self.selected)
        if agent in self.keys:
            return False
        self.keys[agent] = message.keys
        return True

    def directory(self) -> KeyDirectory:
        self._enough("advertised keys", len(self.keys))
        return KeyDirectory(
            round=self.round, keys=tuple(self.keys[agent] for agent in sorted(self.keys))
        )

    # stage 2: shares
    def add_shares(self, message: EncryptedShares) -> bool:
        agent = message.agent
        self._expect(message.round, agent, set(self.keys))
        if agent in self._sealed:
            return False
        expected = set(neighbours(list(self.keys), agent, self.params.degree))
        recipients = [share.recipient for share in message.shares]
        if any(share.sender != agent for share in message.shares) or sorted(recipients) != sorted(
            expected
        ):
            raise ProtocolError(
                f"shares of {agent} are not one for each of its neighbours",
                reason="secagg_bad_share",
            )
        self._sealed[agent] = message.shares
        return True

    @property
    def sharers(self) -> tuple[str, ...]:
        return tuple(sorted(self._sealed))

    def inboxes(self) -> dict[str, ShareInbox]:
        self._enough("sent their shares", len(self._sealed))
        inbox: dict[str, list[SealedShare]] = defaultdict(list)
        for shares in self._sealed.values():
            for share in shares:
                if share.recipient in self._sealed:
                    inbox[share.recipient].append(share)
        return {
            agent: ShareInbox(
                round=self.round,
                agent=agent,
                sharers=self.sharers,
                shares=tuple(sorted(inbox[agent], key=lambda s: s.sender)),
            )
            for agent in self.sharers
        }

    # stage 3: masked uploads
    def add_masked(self, agent: str, vector: U32) -> bool:
        if self._request is not None:
            raise ProtocolError("masked upload after the unmask request", reason="secagg_late")
        self._expect(self.round, agent, set(self._sealed))
        if agent in self.uploaded:
            return False
        if vector.shape != (self.length,) or vector.dtype != np.uint32:
            raise ProtocolError(
                f"masked upload of shape {vector.shape}, expected ({self.length},)",
                reason="wrong_shape",
            )
        self._sum += vector
        self.uploaded.add(agent)
        return True

    def unmask_request(self) -> UnmaskRequest:
        if self._request is None:
            self._enough("uploaded masked updates", len(self.uploaded))
            dropped = sorted(set(self._sealed) - self.uploaded)
            self._request = UnmaskRequest(
                round=self.round, survivors=tuple(sorted(self.uploaded)), dropped=tuple(dropped)
            )
        return self._request

    # stage 4: unmasking
    def add_revealed(self, message: UnmaskShares) -> bool:
        request = self.unmask_request()
        self._expect(message.round, message.agent, set(request.survivors))
        if message.agent in self._revealed:
            return False
        for revealed, into, allowed in (
            (message.seed_shares, self._seed_shares, request.survivors),
            (message.key_shares, self._key_shares, request.dropped),
        ):
            for share in revealed:
                if share.owner in allowed:
                    into[share.owner][share.index] = unb64(share.share)
        self._revealed.add(message.agent)
        return True

    @property
    def revealed_by(self) -> set[str]:
        return set(self._revealed)

    def missing(self) -> list[str]:
        """Secrets that cannot be rebuilt yet, as text; empty once the sum can be unmasked."""
        request = self.unmask_request()
        t = self.params.threshold
        gaps = [f"seed of {a}" for a in request.survivors if len(self._seed_shares[a]) < t]
        gaps += [f"mask key of {a}" for a in request.dropped if len(self._key_shares[a]) < t]
        return gaps

    def result(self) -> tuple[np.ndarray, int]:
        """The float sum of the uploaded updates and how many there are."""
        request = self.unmask_request()
        gaps = self.missing()
        if gaps:
            raise SecAggFailedError(
                f"secure aggregation: too few agents revealed shares to rebuild "
                f"{', '.join(gaps[:5])}{' ...' if len(gaps) > 5 else ''} "
                f"(threshold {self.params.threshold}, {len(self._revealed)} answered)"
            )
        total = self._sum.copy()
        for agent in request.survivors:
            total -= mask_vector(self._combine(self._seed_shares[agent]), self.length)
        sharers = set(self._sealed)
        for gone in request.dropped:
            private = X25519PrivateKey.from_private_bytes(self._combine(self._key_shares[gone]))
            for peer in neighbours(list(self.keys), gone, self.params.degree):
                if peer not in self.uploaded or peer not in sharers:
                    continue
                seed = pairwise_seed(private, unb64(self.keys[peer].mask_key), self.round)
                # The survivor added sign(peer, gone) x mask: take it back out.
                if pair_sign(peer, gone) > 0:
                    total -= mask_vector(seed, self.length)
                else:
                    total += mask_vector(seed, self.length)
        count = len(request.survivors)
        params = self.params
        return (
            dequantise_sum(
                total, agents=count, clip=params.clip_range, levels=params.quantisation_levels
            ),
            count,
        )

    def _combine(self, shares: dict[int, bytes]) -> bytes:
        chosen = sorted(shares.items())[: self.params.threshold]
        return combine_secret(chosen)

    def _enough(self, what: str, count: int) -> None:
        if count < self.params.threshold:
            raise SecAggFailedError(
                f"secure aggregation: only {count} of {len(self.selected)} agents {what} "
                f"by the stage deadline, threshold {self.params.threshold}"
            )

    def _expect(self, number: int, agent: str, allowed: set[str] | frozenset[str]) -> None:
        if number != self.round:
            raise ProtocolError(
                f"secure aggregation message of round {number} in round {self.round}",
                reason="stale_round",
            )
        if agent not in allowed:
            raise ProtocolError(
                f"{agent} is not expected at this stage of round {self.round}",
                reason="secagg_not_expected",
            )
