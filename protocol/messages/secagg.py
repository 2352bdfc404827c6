"""Messages of secure aggregation's stages; bytes travel as standard base64 text.

Per round: agents advertise keys (:class:`AgentKeys`); the coordinator relays the directory
(:class:`KeyDirectory`); agents send encrypted shares (:class:`EncryptedShares`); the
coordinator relays each agent its inbox (:class:`ShareInbox`); agents upload masked updates
(through the ordinary update topics, encoding ``masked_u32``); the coordinator asks for the
shares that unmask the sum (:class:`UnmaskRequest`); agents answer (:class:`UnmaskShares`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import Field

from protocol.errors import ProtocolError
from protocol.messages.base import Id, Message, NonNegativeFloat

__all__ = [
    "AgentKeys",
    "EncryptedShares",
    "KeyDirectory",
    "SecAggParams",
    "ShareInbox",
    "UnmaskRequest",
    "UnmaskShares",
    "b64",
    "unb64",
]

B64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=4096)]
RoundNumber = Annotated[int, Field(ge=0, le=10**9)]
MAX_AGENTS = 10_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"bad base64: {exc}", reason="secagg_bad_message") from exc


class SecAggParams(Message):
    """Secure aggregation settings of a round, inside the signed announcement's config."""

    kind: Literal["secagg_params"] = "secagg_params"
    threshold: Annotated[int, Field(ge=2, le=MAX_AGENTS)]
    degree: Annotated[int, Field(ge=2, le=MAX_AGENTS)]
    clip_range: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0
    quantisation_levels: Annotated[int, Field(ge=1, lt=2**32)] = 2**20
    stage_deadline_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 10.0
    # Distributed DP: the std of the discrete Gaussian noise each agent adds to every
    # coordinate (in the update's units, rounded to whole quantisation steps) before masking,
    # so the sum carries noise the coordinator cannot take out. 0: none.
    dp_noise_stddev: Annotated[float, Field(ge=0.0, le=1e6)] = 0.0


class PeerKeys(Message):
    kind: Literal["peer_keys"] = "peer_keys"
    agent: Id
    mask_key: B64
    share_key: B64


class AgentKeys(Message):
    kind: Literal["secagg_keys"] = "secagg_keys"
    round: RoundNumber
    keys: PeerKeys


class KeyDirectory(Message):
    """Every agent's keys that arrived by the stage deadline (signed by the coordinator)."""

    kind: Literal["secagg_directory"] = "secagg_directory"
    round: RoundNumber
    keys: tuple[PeerKeys, ...] = Field(max_length=MAX_AGENTS)
    issued_at: NonNegativeFloat = 0.0


class SealedShare(Message):
    kind: Literal["sealed_share"] = "sealed_share"
    sender: Id
    recipient: Id
    ciphertext: B64


class EncryptedShares(Message):
    kind: Literal["secagg_shares"] = "secagg_shares"
    round: RoundNumber
    agent: Id
    shares: tuple[SealedShare, ...] = Field(max_length=MAX_AGENTS)


class ShareInbox(Message):
    """For one agent: who shared in time, and the shares sealed for it (signed)."""

    kind: Literal["secagg_inbox"] = "secagg_inbox"
    round: RoundNumber
    agent: Id
    sharers: tuple[Id, ...] = Field(max_length=MAX_AGENTS)
    shares: tuple[SealedShare, ...] = Field(max_length=MAX_AGENTS)


class UnmaskRequest(Message):
    """Who uploaded a masked update (seed shares wanted) and who dropped (key shares)."""

    kind: Literal["secagg_unmask"] = "secagg_unmask"
    round: RoundNumber
    survivors: tuple[Id, ...] = Field(max_length=MAX_AGENTS)
    dropped: tuple[Id, ...] = Field(max_length=MAX_AGENTS)


class RevealedShare(Message):
    kind: Literal["revealed_share"] = "revealed_share"
    owner: Id
    index: Annotated[int, Field(ge=1, le=MAX_AGENTS)]
    share: B64


class UnmaskShares(Message):
    kind: Literal["secagg_revealed"] = "secagg_revealed"
    round: RoundNumber
    agent: Id
    seed_shares: tuple[RevealedShare, ...] = Field(max_length=MAX_AGENTS)
    key_shares: tuple[RevealedShare, ...] = Field(max_length=MAX_AGENTS)
