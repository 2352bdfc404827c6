"""Split learning on the wire, and the bookkeeping that keeps the server's part consistent.

One batch is named by its :class:`BatchId` ``(round, agent, step)``. Its tensors (the cut
layer's activations, and the labels unless the task is U-shaped, going up; the gradient at the
cut coming down) are one :mod:`protocol.tensors` payload, chunked with
:mod:`protocol.chunks`: a manifest on ``split/<round>/<agent>/<step>/<up|down>/manifest`` and
chunks on ``.../<index>``. When the agent has applied the gradient to its part it publishes
``split/<round>/<agent>/<step>/done`` (empty).

Bytes per batch and direction: ``batch * cut_size * 4`` of float32 tensor data, plus the
framing: the safetensors header (8 bytes and a JSON header of about 200 bytes), the JSON
manifest (about 200 bytes) and :data:`~protocol.chunks.CHUNK_HEADER_BYTES` per chunk.
:func:`framing_bytes` computes it exactly for a given payload.

:class:`SplitLedger` is the server's side of SplitFed v2 (one shared server part, trained in
turn): a batch's update is computed, *staged*, and committed only when the agent says done,
so an agent that drops after its activations arrived never leaves the server part half
updated (the staged update is aborted). A batch seen again (an outbox resend) is never
applied twice: the ledger answers it with the reply it already computed. Pure: no I/O.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from protocol.chunks import (
    CHUNK_HEADER_BYTES,
    DEFAULT_MAX_CHUNK_BYTES,
    Reassembler,
    decode_manifest,
    split_blob,
)
from protocol.errors import MessageError, ProtocolError
from protocol.tensors import FloatArray, decode_tensors, encode_tensors
from protocol.topics import Topics

__all__ = [
    "BatchId",
    "Decision",
    "SplitLedger",
    "SplitReceiver",
    "cut_bytes",
    "framing_bytes",
    "payload_tensor_names",
    "split_messages",
]

# How many batches a receiver reassembles at once; more is a flood, not a fleet.
MAX_PENDING_FRAMES = 256
_CONTENT_TYPE = "application/x-fedge-split"
_SAFETENSORS_LENGTH = struct.Struct("<Q")
Reply = TypeVar("Reply")


@dataclass(frozen=True, slots=True, order=True)
class BatchId:
    round: int
    agent: str
    step: int


def cut_bytes(batch_size: int, cut_size: int) -> int:
    """Tensor data bytes of one batch at the cut, each way: float32 is four bytes a value."""
    return batch_size * cut_size * 4


def split_messages(
    topics: Topics,
    batch: BatchId,
    direction: str,
    tensors: Mapping[str, FloatArray],
    *,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> list[tuple[str, bytes]]:
    """The (topic, payload) pairs carrying ``tensors`` for ``batch``: the manifest first."""
    blob = encode_tensors(tensors)
    manifest, chunks = split_blob(blob, max_chunk_bytes=max_chunk_bytes, content_type=_CONTENT_TYPE)
    messages = [
        (
            topics.split_manifest(batch.round, batch.agent, batch.step, direction),
            manifest.model_dump_json().encode(),
        )
    ]
    for index, chunk in enumerate(chunks):
        topic = topics.split_chunk(batch.round, batch.agent, batch.step, direction, index)
        messages.append((topic, chunk))
    return messages


def framing_bytes(messages: list[tuple[str, bytes]]) -> int:
    """Bytes of ``messages`` (from :func:`split_messages`) that are not tensor data."""
    manifest = len(messages[0][1])
    chunks = [payload for _topic, payload in messages[1:]]
    blob = b"".join(chunk[CHUNK_HEADER_BYTES:] for chunk in chunks)
    header = int(_SAFETENSORS_LENGTH.unpack_from(blob)[0])
    return manifest + len(chunks) * CHUNK_HEADER_BYTES + _SAFETENSORS_LENGTH.size + header


def payload_tensor_names(blob: bytes) -> list[str]:
    """The tensor names in a safetensors payload (tests read what a payload carries)."""
    (length,) = _SAFETENSORS_LENGTH.unpack_from(blob)
    header = json.loads(blob[_SAFETENSORS_LENGTH.size : _SAFETENSORS_LENGTH.size + length])
    return sorted(name for name in header if name != "__metadata__")


class SplitReceiver:
    """Reassembles split frames from manifests and chunks arriving in any order.

    ``add`` returns ``(batch, direction, tensors)`` once a frame is whole, else ``None``;
    chunks that come before their manifest wait (bounded). Raises :class:`ProtocolError` for
    a payload that is not a valid manifest, chunk or tensor frame.
    """

    def __init__(self, *, max_pending: int = MAX_PENDING_FRAMES) -> None:
        self._max_pending = max_pending
        self._frames: OrderedDict[tuple[BatchId, str], Reassembler] = OrderedDict()
        self._early: OrderedDict[tuple[BatchId, str], list[bytes]] = OrderedDict()

    def add_manifest(
        self, batch: BatchId, direction: str, payload: bytes
    ) -> tuple[BatchId, str, dict[str, FloatArray]] | None:
        key = (batch, direction)
        if key in self._frames:
            return None
        manifest = decode_manifest(payload)
        if manifest.content_type != _CONTENT_TYPE:
            raise MessageError(f"not a split frame: {manifest.content_type!r}")
        self._frames[key] = Reassembler(manifest)
        self._bound(self._frames, self._max_pending)
        for chunk in self._early.pop(key, []):
            self._frames[key].add(chunk)
        return self._finish(key)

    def add_chunk(
        self, batch: BatchId, direction: str, payload: bytes
    ) -> tuple[BatchId, str, dict[str, FloatArray]] | None:
        key = (batch, direction)
        reassembler = self._frames.get(key)
        if reassembler is None:
            self._early.setdefault(key, []).append(payload)
            self._bound(self._early, self._max_pending)
            return None
        reassembler.add(payload)
        return self._finish(key)

    def _finish(
        self, key: tuple[BatchId, str]
    ) -> tuple[BatchId, str, dict[str, FloatArray]] | None:
        reassembler = self._frames[key]
        if not reassembler.is_complete:
            return None
        del self._frames[key]
        return key[0], key[1], decode_tensors(reassembler.result())

    @staticmethod
    def _bound(table: OrderedDict[tuple[BatchId, str], Any], limit: int) -> None:
        while len(table) > limit:
            table.popitem(last=False)


class Decision(StrEnum):
    APPLY = "apply"  # a new batch, and the server part is free: compute and stage it
    RESEND = "resend"  # seen before: send the stored reply again, apply nothing
    WAIT = "wait"  # another batch is staged: queue this one until it commits or aborts


@dataclass(frozen=True, slots=True)
class _Staged(Generic[Reply]):
    batch: BatchId
    reply: Reply


class SplitLedger(Generic[Reply]):
    """Which batch the shared server part is staging, and which ones it already applied.

    ``Reply`` is whatever the caller sends back (the gradient); the ledger keeps the last
    one per agent, which is all an at-least-once resend can ask for.
    """

    def __init__(self) -> None:
        self._staged: _Staged[Reply] | None = None
        self._last: dict[str, tuple[int, int]] = {}
        self._replies: dict[str, _Staged[Reply]] = {}
        self.applied = 0
        self.aborted = 0

    @property
    def staged(self) -> BatchId | None:
        return None if self._staged is None else self._staged.batch

    def decide(self, batch: BatchId) -> Decision:
        if self._staged is not None and self._staged.batch == batch:
            return Decision.RESEND
        last = self._last.get(batch.agent)
        if last is not None and (batch.round, batch.step) <= last:
            return Decision.RESEND
        return Decision.WAIT if self._staged is not None else Decision.APPLY

    def reply_for(self, batch: BatchId) -> Reply | None:
        """The reply to send again for a batch seen before (``None``: too old to answer)."""
        if self._staged is not None and self._staged.batch == batch:
            return self._staged.reply
        stored = self._replies.get(batch.agent)
        return stored.reply if stored is not None and stored.batch == batch else None

    def stage(self, batch: BatchId, reply: Reply) -> None:
        if self.decide(batch) is not Decision.APPLY:
            raise ProtocolError(f"batch {batch} cannot be staged now")
        self._staged = _Staged(batch, reply)

    def commit(self, batch: BatchId) -> bool:
        """The agent is done with ``batch``: True if that staged update must now be applied."""
        if self._staged is None or self._staged.batch != batch:
            return False
        self._last[batch.agent] = (batch.round, batch.step)
        self._replies[batch.agent] = self._staged
        self._staged = None
        self.applied += 1
        return True

    def abort(self, agent: str) -> BatchId | None:
        """Drop the staged batch of ``agent`` (it went away mid-batch); returns it, if any."""
        if self._staged is None or self._staged.batch.agent != agent:
            return None
        batch = self._staged.batch
        self._staged = None
        self.aborted += 1
        return batch
