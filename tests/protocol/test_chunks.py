"""Chunking and reassembly: round trips, any order, duplicates, corruption, bounds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunks import (
    CHUNK_HEADER_BYTES,
    CHUNK_MAGIC,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_CHUNK_BYTES,
    MAX_MANIFEST_BYTES,
    BlobManifest,
    Reassembler,
    decode_manifest,
    parse_chunk,
    split_blob,
)
from protocol.errors import ChunkError, FedgeError, MessageError

HEADER = struct.Struct(">4sBII32sI")
SMALL_MAX_BYTES = CHUNK_HEADER_BYTES + 10


def _blob(size: int, seed: int = 5) -> bytes:
    return random.Random(seed).randbytes(size)


def _chunk(index: int, count: int, digest: bytes, data: bytes, *, version: int = 1) -> bytes:
    return HEADER.pack(CHUNK_MAGIC, version, index, count, digest, zlib.crc32(data)) + data


def test_header_layout_and_default_sizes() -> None:
    assert CHUNK_HEADER_BYTES == 49
    assert DEFAULT_MAX_CHUNK_BYTES == 128 * 1024
    assert DEFAULT_MAX_BLOB_BYTES == 64 * 1024 * 1024
    manifest, chunks = split_blob(b"hello")
    assert manifest.chunk_bytes == DEFAULT_MAX_CHUNK_BYTES - CHUNK_HEADER_BYTES
    magic, version, index, count, digest, crc = HEADER.unpack_from(chunks[0])
    assert (magic, version, index, count) == (b"FDGC", 1, 0, 1)
    assert digest == hashlib.sha256(b"hello").digest()
    assert crc == zlib.crc32(b"hello")
    assert chunks[0][CHUNK_HEADER_BYTES:] == b"hello"


@pytest.mark.parametrize("size", [1, 9, 10, 11, 100, 1000])
def test_split_then_reassemble_in_order(size: int) -> None:
    blob = _blob(size)
    manifest, chunks = split_blob(blob, max_chunk_bytes=SMALL_MAX_BYTES, content_type="x/y")
    assert manifest.size_bytes == size
    assert manifest.chunk_bytes == 10
    assert manifest.chunk_count == len(chunks) == -(-size // 10)
    assert manifest.sha256 == hashlib.sha256(blob).hexdigest()
    assert manifest.content_type == "x/y"
    assert all(len(chunk) <= SMALL_MAX_BYTES for chunk in chunks)
    reassembler = Reassembler(manifest)
    assert all(reassembler.add(chunk) for chunk in chunks)
    assert reassembler.is_complete
    assert reassembler.result() == blob


def test_empty_blob_has_a_manifest_and_no_chunks() -> None:
    manifest, chunks = split_blob(b"")
    assert chunks == []
    assert (manifest.size_bytes, manifest.chunk_count) == (0, 0)
    reassembler = Reassembler(manifest)
    assert reassembler.is_complete
    assert reassembler.missing() == []
    assert reassembler.result() == b""


def test_five_megabytes_shuffled_and_duplicated() -> None:
    rng = random.Random(1234)
    blob = rng.randbytes(5 * 1024 * 1024)
    manifest, chunks = split_blob(blob)
    assert manifest.chunk_count == 41
    deliveries = chunks + rng.sample(chunks, 15)
    rng.shuffle(deliveries)
    reassembler = Reassembler(manifest)
    new = [reassembler.add(payload) for payload in deliveries]
    assert sum(new) == manifest.chunk_count
    assert new.count(False) == 15
    assert reassembler.received_count == manifest.chunk_count
    assert reassembler.missing() == []
    assert reassembler.result() == blob


def test_missing_and_received_indexes_track_progress() -> None:
    blob = _blob(95)
    manifest, chunks = split_blob(blob, max_chunk_bytes=SMALL_MAX_BYTES)
    reassembler = Reassembler(manifest)
    assert reassembler.missing() == list(range(10))
    for index in (7, 0, 9, 3):
        reassembler.add(chunks[index])
    assert reassembler.missing() == [1, 2, 4, 5, 6, 8]
    assert reassembler.received_indexes() == frozenset({0, 3, 7, 9})
    assert reassembler.received_count == 4
    assert not reassembler.is_complete
    with pytest.raises(ChunkError) as info:
        reassembler.result()
    assert info.value.reason == "incomplete"
    # A restarted receiver replays what it stored: adding again changes nothing.
    assert not reassembler.add(chunks[7])
    for index in reassembler.missing():
        reassembler.add(chunks[index])
    assert reassembler.result() == blob


def test_parse_chunk_gives_its_fields() -> None:
    blob = _blob(25)
    manifest, chunks = split_blob(blob, max_chunk_bytes=SMALL_MAX_BYTES)
    chunk = parse_chunk(chunks[2])
    assert (chunk.index, chunk.count) == (2, 3)
    assert chunk.blob_sha256 == manifest.sha256
    assert chunk.data == blob[20:]


def test_smallest_usable_maximum_is_header_plus_one_byte() -> None:
    manifest, chunks = split_blob(b"abc", max_chunk_bytes=CHUNK_HEADER_BYTES + 1)
    assert manifest.chunk_count == 3
    assert [parse_chunk(chunk).data for chunk in chunks] == [b"a", b"b", b"c"]
    with pytest.raises(ChunkError) as info:
        split_blob(b"abc", max_chunk_bytes=CHUNK_HEADER_BYTES)
    assert info.value.reason == "chunk_too_small"


def test_overlong_content_type_is_refused() -> None:
    with pytest.raises(ChunkError):
        split_blob(b"abc", content_type="x" * 129)


def _corruptions(chunk: bytes) -> dict[str, bytes]:
    flipped_data = bytearray(chunk)
    flipped_data[-1] ^= 0x01
    bad_magic = b"XDGC" + chunk[4:]
    bad_version = chunk[:4] + b"\x02" + chunk[5:]
    _, _, _index, count, digest, _ = HEADER.unpack_from(chunk)
    data = chunk[CHUNK_HEADER_BYTES:]
    return {
        "bad_crc": bytes(flipped_data),
        "bad_magic": bad_magic,
        "bad_version": bad_version,
        "bad_index": _chunk(count, count, digest, data),
        "short": chunk[: CHUNK_HEADER_BYTES - 1],
        "bad_length": _chunk(0, count, digest, b""),
    }


@pytest.mark.parametrize(
    "kind", ["bad_crc", "bad_magic", "bad_version", "bad_index", "short", "bad_length"]
)
def test_corrupted_chunks_are_refused_and_change_nothing(kind: str) -> None:
    blob = _blob(30)
    manifest, chunks = split_blob(blob, max_chunk_bytes=SMALL_MAX_BYTES)
    reassembler = Reassembler(manifest)
    reassembler.add(chunks[1])
    with pytest.raises(ChunkError):
        parse_chunk(_corruptions(chunks[2])[kind])
    with pytest.raises(ChunkError):
        reassembler.add(_corruptions(chunks[2])[kind])
    assert reassembler.missing() == [0, 2]
    assert reassembler.received_count == 1
    reassembler.add(chunks[0])
    reassembler.add(chunks[2])
    assert reassembler.result() == blob


def test_chunks_that_do_not_fit_the_manifest_are_refused() -> None:
    blob = _blob(30)
    manifest, chunks = split_blob(blob, max_chunk_bytes=SMALL_MAX_BYTES)
    digest = bytes.fromhex(manifest.sha256)
    reassembler = Reassembler(manifest)
    _, other_chunks = split_blob(_blob(30, seed=6), max_chunk_bytes=SMALL_MAX_BYTES)
    cases = {
        "wrong_blob": other_chunks[0],
        "wrong_count": _chunk(0, 4, digest, blob[:10]),
        "bad_length": _chunk(0, 3, digest, blob[:9]),  # only the last chunk may be short
    }
    for reason, payload in cases.items():
        with pytest.raises(ChunkError) as info:
            reassembler.add(payload)
        assert info.value.reason == reason
    assert _chunk(2, 3, digest, blob[20:]) == chunks[2]
    with pytest.raises(ChunkError) as info:
        reassembler.add(_chunk(2, 3, digest, blob[20:] + b"!"))
    assert info.value.reason == "bad_length"
    assert reassembler.received_count == 0


def test_tampered_data_with_a_fresh_crc_fails_the_hash_check() -> None:
    blob = _blob(30)
    manifest, chunks = split_blob(blob, max_chunk_bytes=SMALL_MAX_BYTES)
    digest = bytes.fromhex(manifest.sha256)
    reassembler = Reassembler(manifest)
    reassembler.add(chunks[0])
    reassembler.add(chunks[2])
    reassembler.add(_chunk(1, 3, digest, bytes(10)))
    assert reassembler.is_complete
    with pytest.raises(ChunkError) as info:
        reassembler.result()
    assert info.value.reason == "hash_mismatch"


def test_manifest_claiming_ten_gigabytes_is_refused() -> None:
    size = 10 * 1024**3
    manifest = BlobManifest(
        sha256="0" * 64, size_bytes=size, chunk_bytes=131_023, chunk_count=-(-size // 131_023)
    )
    with pytest.raises(ChunkError) as info:
        Reassembler(manifest)
    assert info.value.reason == "too_large"
    small = BlobManifest(sha256="0" * 64, size_bytes=11, chunk_bytes=10, chunk_count=2)
    with pytest.raises(ChunkError):
        Reassembler(small, max_blob_bytes=10)


def test_manifest_round_trips_through_json() -> None:
    manifest, _ = split_blob(_blob(1000), content_type="application/x-fedge-bundle")
    decoded = decode_manifest(manifest.model_dump_json().encode())
    assert decoded == manifest
    assert json.loads(manifest.model_dump_json())["kind"] == "blob_manifest"


def _manifest_json(**changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "kind": "blob_manifest",
        "sha256": "ab" * 32,
        "size_bytes": 25,
        "chunk_bytes": 10,
        "chunk_count": 3,
    }
    fields.update(changes)
    return json.dumps({key: value for key, value in fields.items() if value is not None}).encode()


@pytest.mark.parametrize(
    "payload",
    [
        _manifest_json(chunk_count=2),
        _manifest_json(chunk_count=4),
        _manifest_json(size_bytes=0),  # an empty blob has no chunks
        _manifest_json(sha256="AB" * 32),
        _manifest_json(sha256="ab" * 31),
        _manifest_json(size_bytes=-1),
        _manifest_json(chunk_bytes=0),
        _manifest_json(size_bytes="25"),
        _manifest_json(size_bytes=25.0),
        _manifest_json(kind="signed"),
        _manifest_json(content_type="x" * 129),
        _manifest_json(extra=1),
        _manifest_json(sha256=None),
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"",
    ],
)
def test_bad_manifests_are_refused(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode_manifest(payload)


def test_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(MessageError) as info:
        decode_manifest(b" " * (MAX_MANIFEST_BYTES + 1))
    assert info.value.reason == "too_large"


def test_chunk_size_of_each_index() -> None:
    manifest = decode_manifest(_manifest_json())
    assert [manifest.chunk_size(index) for index in range(3)] == [10, 10, 5]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_into_parse_chunk_raise_only_fedge_errors(data: bytes) -> None:
    try:
        chunk = parse_chunk(data)
    except FedgeError:
        return
    assert chunk.index < chunk.count


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_near_valid_chunks_raise_only_fedge_errors(tail: bytes) -> None:
    try:
        parse_chunk(CHUNK_MAGIC + b"\x01" + tail)
    except FedgeError:
        return


_MANIFEST, _CHUNKS = split_blob(_blob(95), max_chunk_bytes=SMALL_MAX_BYTES)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_into_reassembler_raise_only_fedge_errors(data: bytes) -> None:
    reassembler = Reassembler(_MANIFEST)
    reassembler.add(_CHUNKS[4])
    for payload in (data, _CHUNKS[4][:CHUNK_HEADER_BYTES] + data):
        with contextlib.suppress(FedgeError):
            # Only a replay of chunk 4 itself can parse, and that is a duplicate.
            assert not reassembler.add(payload)
    assert reassembler.received_count == 1


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_into_decode_manifest_raise_only_fedge_errors(data: bytes) -> None:
    try:
        decode_manifest(data)
    except FedgeError:
        return


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=8,
)
_MANIFEST_KEYS = [
    "kind",
    "schema_version",
    "sha256",
    "size_bytes",
    "chunk_bytes",
    "chunk_count",
    "content_type",
]


@settings(max_examples=500, deadline=None)
@given(_json_values | st.dictionaries(st.sampled_from(_MANIFEST_KEYS), _json_values))
def test_random_json_into_decode_manifest_raises_only_fedge_errors(value: object) -> None:
    try:
        manifest = decode_manifest(json.dumps(value).encode())
    except FedgeError:
        return
    assert manifest.chunk_count == -(-manifest.size_bytes // manifest.chunk_bytes)
