"""The :class:`~coordinator.fleet.Fleet` over MQTT.

Agents are known from their retained status messages. Releases go out as retained chunks
of content-addressed blobs plus a signed release on the model's manifest topic; the round
announcement is signed and retained. Updates arrive as QoS 1 chunks on the round's update
topics, to a persistent session, so updates sent while the coordinator was down wait for
it at the broker; they are reassembled here, bounded in size, and checked against the hash
in the agent's completion message before the round logic sees them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.fleet import AgentInfo, Fleet, ReceivedUpdate, SecAggMessage
from protocol.chunks import BlobManifest, Reassembler, parse_chunk, split_blob
from protocol.errors import ChunkError, FedgeError
from protocol.messages.agent import AgentState, AgentStatus, ErrorEvent
from protocol.messages.base import Message
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.rounds import ModelRelease, RoundAnnouncement, UpdateComplete
from protocol.signing import SigningKey
from protocol.topics import ParsedTopic, TopicKind, Topics, sender
from runtime.mqtt import MqttLink

__all__ = ["MqttFleet"]

logger = logging.getLogger(__name__)

MAX_UPDATE_BYTES = 64 * 1024 * 1024
MAX_PENDING_CHUNKS_PER_AGENT = 4096
KEEP_RELEASES = 2  # weights blobs of older releases are removed from the broker
MAX_STATUS_REPORTS = 1024  # distinct (topic, reason) pairs reported about agent statuses


@dataclass
class _PendingUpdate:
    chunks: list[bytes] = field(default_factory=list)
    bytes_received: int = 0
    complete: UpdateComplete | None = None
    reassembler: Reassembler | None = None


class MqttFleet(Fleet):
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        signing_key: SigningKey,
        *,
        max_chunk_bytes: int,
        on_command: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.link = link
        self.topics = topics
        self._key = signing_key
        self._max_chunk_bytes = max_chunk_bytes
        self._on_command = on_command
        self._agents: dict[str, AgentInfo] = {}
        self._lock = threading.Lock()
        self._updates: queue.Queue[ReceivedUpdate] = queue.Queue()
        self._secagg: queue.Queue[SecAggMessage] = queue.Queue()
        self._pending: dict[tuple[int, str], _PendingUpdate] = {}
        self._round_filter: str | None = None
        self._published_blobs: set[str] = set()
        self._release_history: list[ModelRelease] = []
        # Chunks are held only for agents selected in a round this fleet announced, and one
        # error event is sent per agent and reason, so a flood costs neither memory nor noise.
        self._selected: dict[int, frozenset[str]] = {}
        self._reported: set[tuple[int, str, str]] = set()
        self._status_reported: set[tuple[str, str]] = set()
        self.on_own_retained: Callable[[str, bytes], None] | None = None
        self.on_stalled_blob: Callable[[str], None] | None = None
        self.bytes_published = 0

    # wiring: the daemon routes the link's messages here
    def subscribe(self) -> None:
        self.link.subscribe(self.topics.all_agent_statuses(), qos=1)
        self.link.subscribe(self.topics.coordinator_commands(), qos=1)
        # Our own retained releases come back on every (re)subscribe: proof the broker
        # still has them (coordinator.recovery).
        self.link.subscribe(self.topics.all_model_manifests(), qos=1)
        self.link.subscribe(self.topics.round_current(), qos=1)
        self.link.subscribe(self.topics.all_secagg_from_agents(), qos=1)

    def republish_blob(self, digest: str, data: bytes) -> None:
        """One blob's retained chunks again (an agent's fetch of it stalled)."""
        _, chunks = split_blob(data, max_chunk_bytes=self._max_chunk_bytes)
        for index, chunk in enumerate(chunks):
            self.link.publish(self.topics.blob_chunk(digest, index), chunk, retain=True)

    def forget_published(self) -> None:
        """The broker lost its retained messages: the next release publishes every blob."""
        with self._lock:
            self._published_blobs.clear()

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            self._dispatch(topic, payload)
        except Exception as exc:
            # A bug, but still answered: the sender sees an event, the log the traceback.
            logger.exception("message on %s failed", topic)
            self.report_error("internal", f"message on {topic} failed: {exc!r}")

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            parsed = self.topics.parse(topic)
        except FedgeError:
            return
        if parsed.kind is TopicKind.AGENT_STATUS:
            self._on_status(parsed, topic, payload)
        elif parsed.kind is TopicKind.COORDINATOR_COMMANDS and self._on_command:
            self._on_command(topic, payload)
        elif parsed.kind in {TopicKind.UPDATE_CHUNK, TopicKind.UPDATE_MANIFEST}:
            self._on_update_message(parsed, topic, payload)
        elif (
            parsed.kind in {TopicKind.MODEL_MANIFEST, TopicKind.ROUND_CURRENT}
            and self.on_own_retained is not None
        ):
            self.on_own_retained(topic, payload)
        elif parsed.kind is TopicKind.SECAGG_AGENT:
            self._secagg.put(
                SecAggMessage(parsed.round or 0, parsed.stage or "", parsed.agent or "", payload)
            )

    # Fleet
    def agents(self) -> dict[str, AgentInfo]:
        with self._lock:
            return dict(self._agents)

    def publish_release(self, release: ModelRelease, blobs: dict[str, bytes]) -> int:
        published = 0
        for digest, data in blobs.items():
            if digest in self._published_blobs:
                continue
            _, chunks = split_blob(data, max_chunk_bytes=self._max_chunk_bytes)
            for index, chunk in enumerate(chunks):
                self.link.publish(self.topics.blob_chunk(digest, index), chunk, retain=True)
                published += len(chunk)
            self._published_blobs.add(digest)
        signed = self._key.sign(release.model_dump_json())
        self.link.publish(
            self.topics.model_manifest(release.version), encode_message(signed), retain=True
        )
        self._forget_old_releases(release)
        self.bytes_published += published
        return published

    def announce(self, announcement: RoundAnnouncement) -> None:
        with self._lock:
            self._selected[announcement.round] = frozenset(announcement.selected)
        self._follow_round(announcement.round)
        signed = self._key.sign(announcement.model_dump_json())
        self.link.publish(self.topics.round_current(), encode_message(signed), retain=True)

    def next_update(self, round_number: int, timeout_s: float) -> ReceivedUpdate | None:
        del round_number  # stale rounds are refused by the round logic, with an event
        try:
            return self._updates.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return None

    def next_secagg(self, timeout_s: float) -> SecAggMessage | None:
        try:
            return self._secagg.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return None

    def publish_secagg(
        self, round_number: int, stage: str, message: Message, *, agent: str | None = None
    ) -> int:
        if agent is not None:
            topic = self.topics.secagg_inbox(round_number, agent)
        else:
            topic = self.topics.secagg_broadcast(round_number, stage)
        payload = encode_message(self._key.sign(message.model_dump_json()))
        self.link.publish(topic, payload)
        return len(payload)

    def reject(self, event: ErrorEvent, *, agent: str | None = None) -> None:
        del agent  # the message names the agent; agents watch the coordinator's events
        self.link.publish(self.topics.coordinator_events(), encode_message(event))

    def now(self) -> float:
        return time.time()

    def pause(self, seconds: float) -> None:
        # Agents' status messages arrive on the network thread meanwhile.
        threading.Event().wait(seconds)

    # internals
    def _on_status(self, parsed: ParsedTopic, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained status: the agent was retired
            with self._lock:
                self._agents.pop(parsed.agent or "", None)
            return
        try:
            status = decode_message(payload, AgentStatus)
            sender(parsed, status.agent)
        except FedgeError as exc:
            self._report_status_once(topic, exc.reason, f"agent status on {topic} refused: {exc}")
            return
        capabilities = status.capabilities
        info = AgentInfo(
            agent=status.agent,
            online=status.state is AgentState.ONLINE,
            can_train=bool(capabilities and capabilities.can_train),
            trainers=capabilities.trainers if capabilities else (),
            samples_by_label=tuple(sorted(status.samples_by_label.items())),
        )
        with self._lock:
            self._agents[status.agent] = info
        if status.stalled_blob is not None and self.on_stalled_blob is not None:
            self.on_stalled_blob(status.stalled_blob)

    def _report_status_once(self, topic: str, reason: str, message: str) -> None:
        with self._lock:
            if len(self._status_reported) >= MAX_STATUS_REPORTS:
                self._status_reported.clear()
            key = (topic, message[:256])  # one report per topic and distinct refusal
            first = key not in self._status_reported
            self._status_reported.add(key)
        if first:
            self.report_error(reason, message)

    def _follow_round(self, round_number: int) -> None:
        new_filter = self.topics.round_updates(round_number)
        if self._round_filter == new_filter:
            return
        if self._round_filter is not None:
            self.link.unsubscribe(self._round_filter)
        self._round_filter = new_filter
        self.link.subscribe(new_filter, qos=1)
        with self._lock:
            self._pending = {k: v for k, v in self._pending.items() if k[0] >= round_number}
            self._selected = {r: s for r, s in self._selected.items() if r >= round_number}
            self._reported = {k for k in self._reported if k[0] >= round_number}

    def _on_update_message(self, parsed: ParsedTopic, topic: str, payload: bytes) -> None:
        assert parsed.round is not None
        assert parsed.agent is not None
        key = (parsed.round, parsed.agent)
        with self._lock:
            selected = self._selected.get(parsed.round)
        if selected is not None and parsed.agent not in selected:
            self._report_once(
                key,
                "not_selected",
                f"agent {parsed.agent} was not selected for round {parsed.round}",
            )
            return
        try:
            if parsed.kind is TopicKind.UPDATE_MANIFEST:
                complete = _completion_from(parsed, topic, payload)
                self._on_complete(key, complete)
            else:
                self._on_chunk(key, payload)
        except FedgeError as exc:
            self._report_once(key, exc.reason, f"update message on {topic} refused: {exc}")

    def _on_complete(self, key: tuple[int, str], complete: UpdateComplete) -> None:
        try:
            manifest = BlobManifest(
                sha256=complete.update_sha256,
                size_bytes=complete.update_size_bytes,
                chunk_bytes=complete.chunk_bytes,
                chunk_count=complete.chunk_count,
            )
        except ValueError as exc:  # pydantic's ValidationError: sizes that do not fit
            raise ChunkError(
                f"update completion does not describe a blob: {exc}", reason="bad_manifest"
            ) from exc
        reassembler = Reassembler(manifest, max_blob_bytes=MAX_UPDATE_BYTES)
        with self._lock:
            pending = self._pending.setdefault(key, _PendingUpdate())
            if pending.complete is not None:
                return  # a repeated completion message (QoS 1 redelivery)
            pending.complete = complete
            pending.reassembler = reassembler
            chunks, pending.chunks = pending.chunks, []
        for chunk in chunks:
            self._feed(key, chunk)
        self._maybe_done(key)

    def _on_chunk(self, key: tuple[int, str], payload: bytes) -> None:
        with self._lock:
            pending = self._pending.setdefault(key, _PendingUpdate())
            if pending.complete is not None and pending.reassembler is None:
                return  # this update is already complete: a chunk sent again
            pending.bytes_received += len(payload)
            if pending.reassembler is None:
                if len(pending.chunks) >= MAX_PENDING_CHUNKS_PER_AGENT:
                    raise FedgeError("too many update chunks before completion", reason="flood")
                parse_chunk(payload)  # refuse garbage early
                pending.chunks.append(payload)
                return
        self._feed(key, payload)
        self._maybe_done(key)

    def _feed(self, key: tuple[int, str], payload: bytes) -> None:
        refused: FedgeError | None = None
        with self._lock:
            pending = self._pending.get(key)
            if pending is None or pending.reassembler is None:
                return
            try:
                pending.reassembler.add(payload)
            except FedgeError as exc:
                refused = exc
        if refused is not None:  # reported outside the lock: reporting takes it too
            message = f"update chunk from {key[1]} refused: {refused}"
            self._report_once(key, refused.reason, message)

    def _maybe_done(self, key: tuple[int, str]) -> None:
        with self._lock:
            pending = self._pending.get(key)
            if pending is None or pending.reassembler is None or pending.complete is None:
                return
            if not pending.reassembler.is_complete:
                return
            reassembler, complete = pending.reassembler, pending.complete
            bytes_received = pending.bytes_received
            self._pending[key] = _PendingUpdate(complete=complete)  # done: ignore repeats
        try:
            payload = reassembler.result()
        except FedgeError as exc:
            self.report_error(exc.reason, f"update from {key[1]} refused: {exc}")
            return
        self._updates.put(ReceivedUpdate(complete, payload, bytes_received))

    def _report_once(self, key: tuple[int, str], reason: str, message: str) -> None:
        with self._lock:
            first = (key[0], key[1], reason) not in self._reported
            self._reported.add((key[0], key[1], reason))
        if first:
            self.report_error(reason, message)

    def report_error(self, reason: str, message: str) -> None:
        logger.warning("%s", message)
        self.reject(ErrorEvent(reason=reason, message=message[:1024], timestamp=time.time()))

    def _forget_old_releases(self, release: ModelRelease) -> None:
        """Keep retained weights of the newest releases only; others are cleared."""
        self._release_history.append(release)
        while len(self._release_history) > KEEP_RELEASES:
            old = self._release_history.pop(0)
            live = {r.weights.sha256 for r in self._release_history}
            live |= {r.trainable.sha256 for r in self._release_history}
            if old.weights.sha256 in live:
                continue
            for index in range(old.weights.chunk_count):
                # An empty retained message deletes the retained one (MQTT 3.3.1.3).
                self.link.publish(
                    self.topics.blob_chunk(old.weights.sha256, index), b"", retain=True
                )
            self._published_blobs.discard(old.weights.sha256)
            self.link.publish(self.topics.model_manifest(old.version), b"", retain=True)


def _completion_from(parsed: ParsedTopic, topic: str, payload: bytes) -> UpdateComplete:
    """An update's completion message, if it speaks for the agent and round of its topic."""
    complete = decode_message(payload, UpdateComplete)
    sender(parsed, complete.agent)
    if complete.round != parsed.round:
        raise FedgeError(
            f"update completion on {topic} names round {complete.round}", reason="wrong_topic"
        )
    return complete
