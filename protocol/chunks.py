"""Chunking: any blob split into MQTT payloads of bounded size, and put back together.

A transfer is one JSON manifest (:class:`BlobManifest`: sha256 of the whole blob, its size,
the data bytes per chunk, the chunk count, a content type) and ``chunk_count`` chunk
payloads. Each chunk payload is a fixed binary header followed by the data::

    offset  size  field (big-endian)
    0       4     magic b"FDGC"
    4       1     format version, 1
    5       4     chunk index, u32
    9       4     chunk count, u32
    13      32    sha256 of the whole blob, raw bytes
    45      4     crc32 of this chunk's data, u32
    49      ...   data

Every chunk carries exactly ``chunk_bytes`` of data except the last, which carries the rest;
an empty blob has a manifest and no chunks. The whole payload, header included, is at most
``max_chunk_bytes`` (default 128 KiB, which fits AWS IoT Core's message limit), so
``chunk_bytes = max_chunk_bytes - CHUNK_HEADER_BYTES``.

:class:`Reassembler` takes chunks in any order, ignores duplicates, refuses chunks of other
blobs or of the wrong length, holds no more memory than the manifest's size, and checks the
sha256 of the whole before handing it out. It does no I/O: a caller that wants to resume
after a restart stores the chunk payloads itself and adds them again (``add`` is idempotent).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Annotated, Literal, Self

from pydantic import Field, ValidationError, model_validator

from protocol.errors import ChunkError, MessageError
from protocol.messages.base import Message

__all__ = [
    "CHUNK_FORMAT_VERSION",
    "CHUNK_HEADER_BYTES",
    "CHUNK_MAGIC",
    "DEFAULT_MAX_BLOB_BYTES",
    "DEFAULT_MAX_CHUNK_BYTES",
    "MAX_MANIFEST_BYTES",
    "BlobManifest",
    "Chunk",
    "Reassembler",
    "decode_manifest",
    "parse_chunk",
    "split_blob",
]

CHUNK_MAGIC = b"FDGC"
CHUNK_FORMAT_VERSION = 1
DEFAULT_MAX_CHUNK_BYTES = 128 * 1024
DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 4096
_HEADER = struct.Struct(">4sBII32sI")
CHUNK_HEADER_BYTES = _HEADER.size
_MAX_CHUNK_COUNT = 2**32 - 1
_DEFAULT_CONTENT_TYPE = "application/octet-stream"


class BlobManifest(Message):
    """What a receiver needs to know before the chunks of one blob arrive."""

    kind: Literal["blob_manifest"] = "blob_manifest"
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size_bytes: Annotated[int, Field(ge=0)]
    chunk_bytes: Annotated[int, Field(ge=1)]
    chunk_count: Annotated[int, Field(ge=0, le=_MAX_CHUNK_COUNT)]
    content_type: Annotated[str, Field(max_length=128)] = _DEFAULT_CONTENT_TYPE

    @model_validator(mode="after")
    def _count_matches_size(self) -> Self:
        expected = -(-self.size_bytes // self.chunk_bytes)
        if self.chunk_count != expected:
            raise ValueError(
                f"chunk_count {self.chunk_count} does not match size_bytes "
                f"{self.size_bytes} in chunks of {self.chunk_bytes} (expected {expected})"
            )
        return self

    def chunk_size(self, index: int) -> int:
        """Data bytes carried by chunk ``index``: ``chunk_bytes`` except for the last."""
        if index < self.chunk_count - 1:
            return self.chunk_bytes
        return self.size_bytes - (self.chunk_count - 1) * self.chunk_bytes


@dataclass(frozen=True, slots=True)
class Chunk:
    """One parsed chunk payload."""

    index: int
    count: int
    blob_sha256: str
    data: bytes


def split_blob(
    blob: bytes,
    *,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    content_type: str = _DEFAULT_CONTENT_TYPE,
) -> tuple[BlobManifest, list[bytes]]:
    """Split ``blob`` into a manifest and chunk payloads of at most ``max_chunk_bytes`` each."""
    chunk_bytes = max_chunk_bytes - CHUNK_HEADER_BYTES
    if chunk_bytes < 1:
        raise ChunkError(
            f"max_chunk_bytes {max_chunk_bytes} cannot hold the {CHUNK_HEADER_BYTES}-byte "
            "header and any data",
            reason="chunk_too_small",
        )
    digest = hashlib.sha256(blob).digest()
    try:
        manifest = BlobManifest(
            sha256=digest.hex(),
            size_bytes=len(blob),
            chunk_bytes=chunk_bytes,
            chunk_count=-(-len(blob) // chunk_bytes),
            content_type=content_type,
        )
    except ValidationError as exc:
        raise ChunkError(f"cannot describe this blob: {exc}", reason="bad_manifest") from exc
    view = memoryview(blob)
    chunks = []
    for index in range(manifest.chunk_count):
        data = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        header = _HEADER.pack(
            CHUNK_MAGIC,
            CHUNK_FORMAT_VERSION,
            index,
            manifest.chunk_count,
            digest,
            zlib.crc32(data),
        )
        chunks.append(header + data)
    return manifest, chunks


def parse_chunk(payload: bytes) -> Chunk:
    """Parse and check one chunk payload (header fields and the data's crc32)."""
    if len(payload) < CHUNK_HEADER_BYTES:
        raise ChunkError(f"chunk payload of {len(payload)} bytes is shorter than its header")
    magic, version, index, count, digest, crc = _HEADER.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise ChunkError("chunk payload has the wrong magic", reason="bad_magic")
    if version != CHUNK_FORMAT_VERSION:
        raise ChunkError(f"unsupported chunk format version {version}", reason="bad_version")
    if index >= count:
        raise ChunkError(f"chunk index {index} is not below count {count}", reason="bad_index")
    data = bytes(payload[CHUNK_HEADER_BYTES:])
    if not data:
        raise ChunkError(f"chunk {index} carries no data", reason="bad_length")
    if zlib.crc32(data) != crc:
        raise ChunkError(f"chunk {index} fails its crc32 check", reason="bad_crc")
    return Chunk(index=index, count=count, blob_sha256=digest.hex(), data=data)


def decode_manifest(data: bytes) -> BlobManifest:
    """Decode a manifest's JSON; raises :class:`MessageError` for anything else."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise MessageError(
            f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}", reason="too_large"
        )
    try:
        return BlobManifest.model_validate_json(data)
    except ValidationError as exc:
        raise MessageError(f"not a blob manifest: {exc}") from exc


class Reassembler:
    """Collects the chunks of one blob, in any order, into a buffer of the blob's size."""

    def __init__(
        self, manifest: BlobManifest, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
    ) -> None:
        if manifest.size_bytes > max_blob_bytes:
            raise ChunkError(
                f"blob of {manifest.size_bytes} bytes exceeds the limit of {max_blob_bytes}",
                reason="too_large",
            )
        self._manifest = manifest
        self._buffer = bytearray(manifest.size_bytes)
        # One flag byte per chunk; a chunk holds at least one byte, so this never outgrows
        # the blob itself.
        self._received = bytearray(manifest.chunk_count)
        self._received_count = 0

    @property
    def manifest(self) -> BlobManifest:
        return self._manifest

    @property
    def received_count(self) -> int:
        return self._received_count

    @property
    def is_complete(self) -> bool:
        return self._received_count == self._manifest.chunk_count

    def add(self, payload: bytes) -> bool:
        """Add one chunk payload; True if it was new, False for a duplicate.

        A chunk that does not belong to this blob raises :class:`ChunkError` and leaves the
        state unchanged.
        """
        chunk = parse_chunk(payload)
        manifest = self._manifest
        if chunk.blob_sha256 != manifest.sha256:
            raise ChunkError("chunk belongs to another blob", reason="wrong_blob")
        if chunk.count != manifest.chunk_count:
            raise ChunkError(
                f"chunk says {chunk.count} chunks, manifest says {manifest.chunk_count}",
                reason="wrong_count",
            )
        expected = manifest.chunk_size(chunk.index)
        if len(chunk.data) != expected:
            raise ChunkError(
                f"chunk {chunk.index} carries {len(chunk.data)} bytes, expected {expected}",
                reason="bad_length",
            )
        if self._received[chunk.index]:
            return False
        offset = chunk.index * manifest.chunk_bytes
        self._buffer[offset : offset + expected] = chunk.data
        self._received[chunk.index] = 1
        self._received_count += 1
        return True

    def missing(self) -> list[int]:
        """Indexes of the chunks not yet received, ascending."""
        return [index for index, seen in enumerate(self._received) if not seen]

    def received_indexes(self) -> frozenset[int]:
        return frozenset(index for index, seen in enumerate(self._received) if seen)

    def result(self) -> bytes:
        """The whole blob, once every chunk is in and its sha256 matches the manifest."""
        if not self.is_complete:
            raise ChunkError(
                f"blob incomplete: {len(self.missing())} of {self._manifest.chunk_count} "
                "chunks missing",
                reason="incomplete",
            )
        if (
            len(self._buffer) != self._manifest.size_bytes
            or hashlib.sha256(self._buffer).hexdigest() != self._manifest.sha256
        ):
            raise ChunkError("reassembled blob does not match its sha256", reason="hash_mismatch")
        return bytes(self._buffer)
