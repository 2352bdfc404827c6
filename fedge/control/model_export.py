"""Take a release's serving model off the broker: its signed manifest, then the variant's chunks.

What ``fedge model export`` writes is the very file agents serve (its sha256 checked against
the manifest), ready for ``fedge model merge`` or for an agent's ``--model``.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from fedge.control.model_card import CONNECT_TIMEOUT_S, read_model_card
from protocol.chunks import BlobManifest
from protocol.errors import ConfigError
from protocol.messages.rounds import ModelRelease, ModelVariant
from protocol.topics import Topics
from runtime.mqtt import BrokerAddress, MqttLink
from runtime.transfer import BlobFetcher

__all__ = ["BLOB_TIMEOUT_S", "fetch_variant"]

BLOB_TIMEOUT_S = 120.0


def fetch_variant(
    broker: BrokerAddress,
    topics: Topics,
    version: str,
    variant: str,
    *,
    coordinator_key: Path | None = None,
) -> tuple[ModelRelease, ModelVariant, bytes]:
    """Release ``version``, its variant called ``variant`` and that variant's bytes."""
    release, _, _ = read_model_card(broker, topics, version, coordinator_key=coordinator_key)
    chosen = next((v for v in release.variants if v.name == variant), None)
    if chosen is None:
        known = ", ".join(v.name for v in release.variants) or "none"
        raise ConfigError(
            f"release {version} has no variant {variant!r} (its variants: {known})",
            reason="unknown_variant",
        )
    ref = chosen.blob
    manifest = BlobManifest(
        sha256=ref.sha256,
        size_bytes=ref.size_bytes,
        chunk_bytes=ref.chunk_bytes,
        chunk_count=ref.chunk_count,
        content_type=ref.content_type,
    )
    fetchers: list[BlobFetcher] = []

    def on_message(topic: str, payload: bytes) -> None:
        for fetcher in fetchers:
            if fetcher.handles(topic):
                fetcher.on_message(topic, payload)

    link = MqttLink(
        broker,
        client_id=f"fedge-export-{uuid.uuid4().hex[:8]}",
        clean_session=True,
        on_message=on_message,
    )
    link.start()
    with tempfile.TemporaryDirectory(prefix="fedge-export-") as spool:
        fetcher = BlobFetcher(
            link,
            manifest,
            chunk_topic=lambda i: topics.blob_chunk(ref.sha256, i),
            spool_root=Path(spool),
        )
        fetchers.append(fetcher)
        try:
            link.wait_connected(CONNECT_TIMEOUT_S)
            fetcher.start()
            data = fetcher.wait(BLOB_TIMEOUT_S)
        finally:
            fetcher.stop()
            link.stop()
    return release, chosen, data
