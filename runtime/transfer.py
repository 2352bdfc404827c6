"""Moving blobs (model bundles, updates) over MQTT as chunks, resumably.

Sending: every chunk is one QoS 1 message on its own topic, then the manifest. Chunks
of a model bundle are retained, so an agent that comes late, or comes back, finds them.

Fetching: :class:`BlobFetcher` subscribes to each chunk topic it still lacks, one filter
per chunk, and drops the subscription as soon as the chunk is in. After a disconnect the
link renews only what is left, so the broker re-delivers only the missing retained
chunks. Received chunks are spooled to disk, so a restarted process resumes too.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from protocol.chunks import (
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_CHUNK_BYTES,
    BlobManifest,
    Reassembler,
    parse_chunk,
    split_blob,
)
from protocol.errors import ChunkError, FedgeError
from runtime.mqtt import MqttLink

__all__ = ["BlobFetcher", "publish_blob"]

logger = logging.getLogger(__name__)

ChunkTopic = Callable[[int], str]


def publish_blob(
    link: MqttLink,
    blob: bytes,
    *,
    chunk_topic: ChunkTopic,
    retain: bool = False,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    order: Iterable[int] | None = None,
) -> tuple[BlobManifest, list[bytes]]:
    """Publish ``blob``'s chunks (QoS 1) in ``order`` (default: ascending); return them.

    The caller publishes the manifest (or a message that carries it) afterwards, on the
    topic and with the signature its protocol needs.
    """
    manifest, chunks = split_blob(blob, max_chunk_bytes=max_chunk_bytes)
    for index in range(len(chunks)) if order is None else order:
        link.publish(chunk_topic(index), chunks[index], qos=1, retain=retain)
    return manifest, chunks


class BlobFetcher:
    """Collects one blob's chunks from their topics; resumable through a spool directory."""

    def __init__(
        self,
        link: MqttLink,
        manifest: BlobManifest,
        *,
        chunk_topic: ChunkTopic,
        spool_root: Path,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.manifest = manifest
        self._link = link
        self._chunk_topic = chunk_topic
        # One spool directory per blob, named by its hash, so resumes never mix blobs.
        self._spool_dir = spool_root / manifest.sha256
        self._on_progress = on_progress
        self._reassembler = Reassembler(manifest, max_blob_bytes=max_blob_bytes)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._topic_index: dict[str, int] = {}
        self.chunks_received = 0  # chunk messages seen from the broker, duplicates included
        self.chunks_new = 0  # chunks that were not already held (spooled or received)
        self.chunks_rejected = 0
        self._resume_from_spool()

    @property
    def missing(self) -> list[int]:
        with self._lock:
            return self._reassembler.missing()

    def start(self) -> None:
        """Subscribe to every chunk still missing (none if the spool already had them all)."""
        for index in self.missing:
            topic = self._chunk_topic(index)
            self._topic_index[topic] = index
            self._link.subscribe(topic, qos=1)
        if self._reassembler.is_complete:
            self._done.set()

    def stop(self) -> None:
        for topic in list(self._topic_index):
            self._link.unsubscribe(topic)
        self._topic_index.clear()

    def handles(self, topic: str) -> bool:
        return topic in self._topic_index

    def on_message(self, topic: str, payload: bytes) -> None:
        """Feed one chunk message (from the link's message handler)."""
        with self._lock:
            self.chunks_received += 1
            try:
                is_new = self._reassembler.add(payload)
            except ChunkError as exc:
                self.chunks_rejected += 1
                logger.warning("chunk on %s refused: %s", topic, exc)
                return
            if is_new:
                self.chunks_new += 1
                self._spool(payload)
            received = self._reassembler.received_count
            complete = self._reassembler.is_complete
        index = self._topic_index.pop(topic, None)
        if index is not None:
            self._link.unsubscribe(topic)
        if self._on_progress is not None:
            self._on_progress(received, self.manifest.chunk_count)
        if complete:
            self._done.set()

    def wait(self, timeout_s: float) -> bytes:
        """The verified blob, once every chunk is in; raise ChunkError on timeout or bad hash."""
        if not self._done.wait(timeout_s):
            raise ChunkError(
                f"blob {self.manifest.sha256[:12]} incomplete after {timeout_s:g} s: "
                f"{len(self.missing)} of {self.manifest.chunk_count} chunks missing",
                reason="timeout",
            )
        with self._lock:
            return self._reassembler.result()

    def discard_spool(self) -> None:
        for path in self._spool_dir.glob("*.chunk"):
            path.unlink(missing_ok=True)

    def _resume_from_spool(self) -> None:
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self._spool_dir.glob("*.chunk")):
            try:
                self._reassembler.add(path.read_bytes())
            except (FedgeError, OSError) as exc:
                logger.warning("dropping unusable spooled chunk %s: %s", path, exc)
                path.unlink(missing_ok=True)
        if self._reassembler.received_count:
            logger.info(
                "resuming blob %s: %d of %d chunks already spooled",
                self.manifest.sha256[:12],
                self._reassembler.received_count,
                self.manifest.chunk_count,
            )

    def _spool(self, payload: bytes) -> None:
        index = parse_chunk(payload).index
        path = self._spool_dir / f"{index:08d}.chunk"
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(payload)
        os.replace(temporary, path)
