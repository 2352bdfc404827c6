"""Read a release's model card off the broker: its retained manifest and agents' statuses."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from coordinator.model_card import CardRow, card_rows
from protocol.errors import FedgeError, TransportError
from protocol.messages.agent import AgentStatus
from protocol.messages.codec import decode_message
from protocol.messages.rounds import ModelRelease
from protocol.signing import SignedMessage, load_verify_key
from protocol.topics import TopicKind, Topics
from runtime.mqtt import BrokerAddress, MqttLink

__all__ = ["read_model_card"]

CONNECT_TIMEOUT_S = 10.0
MANIFEST_TIMEOUT_S = 5.0
# Retained statuses arrive right after the subscription; stop once none came for this long.
QUIET_S = 0.5


def read_model_card(
    broker: BrokerAddress,
    topics: Topics,
    version: str,
    *,
    coordinator_key: Path | None = None,
) -> tuple[ModelRelease, list[CardRow], bool]:
    """The release, its card rows, and whether its signature was checked (with the key)."""
    verify = load_verify_key(coordinator_key) if coordinator_key is not None else None
    manifest: list[ModelRelease] = []
    statuses: dict[str, AgentStatus] = {}
    arrived = threading.Event()
    last = [time.monotonic()]
    errors: list[str] = []

    def on_message(topic: str, payload: bytes) -> None:
        last[0] = time.monotonic()
        kind = None
        try:
            kind = topics.parse(topic).kind
            if kind is TopicKind.MODEL_MANIFEST:
                signed = decode_message(payload, SignedMessage)
                body = verify.verify(signed) if verify is not None else signed.body
                manifest.append(decode_message(body, ModelRelease))
                arrived.set()
            elif kind is TopicKind.AGENT_STATUS:
                status = decode_message(payload, AgentStatus)
                statuses[status.agent] = status
        except FedgeError as exc:
            errors.append(f"{topic}: {exc}")
            if kind is TopicKind.MODEL_MANIFEST:
                arrived.set()

    link = MqttLink(
        broker,
        client_id=f"fedge-card-{uuid.uuid4().hex[:8]}",
        clean_session=True,
        on_message=on_message,
    )
    link.subscribe(topics.model_manifest(version), qos=1)
    link.subscribe(topics.all_agent_statuses(), qos=1)
    link.start()
    try:
        link.wait_connected(CONNECT_TIMEOUT_S)
        if not arrived.wait(MANIFEST_TIMEOUT_S) or not manifest:
            raise TransportError(
                f"no release {version!r} on this broker and fleet"
                + (f" ({errors[-1]})" if errors else ""),
                reason="no_release",
            )
        while time.monotonic() - last[0] < QUIET_S:
            time.sleep(QUIET_S / 5)  # waiting out the burst of retained statuses
    finally:
        link.stop()
    release = manifest[-1]
    choices = [s.variant for s in statuses.values() if s.variant is not None]
    return release, card_rows(release, choices), verify is not None
