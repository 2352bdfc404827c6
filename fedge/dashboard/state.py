"""What the dashboard knows about a fleet, built only from what the fleet publishes on MQTT.

:class:`FleetView` takes ``(topic, payload)`` pairs (retained agent and coordinator status,
round announcements, releases, update manifests, results) and keeps a bounded picture of the
fleet that :meth:`FleetView.snapshot` turns into plain JSON for the page. Every payload is
untrusted: a malformed one is counted and dropped, never raised.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from protocol.errors import FedgeError
from protocol.messages.agent import AgentStatus, InferenceResult
from protocol.messages.codec import decode_message
from protocol.messages.rounds import (
    CoordinatorStatus,
    ModelRelease,
    RoundAnnouncement,
    UpdateComplete,
)
from protocol.signing import VerifyKey, decode_signed
from protocol.topics import TopicKind, Topics

__all__ = ["FleetView"]

# Bounds, so a flood of forged ids cannot grow the dashboard without limit.
MAX_AGENTS = 1024
MAX_CAMERAS = 256
MAX_ROUNDS = 1000
MAX_PREDICTIONS = 3


class FleetView:
    """A thread-safe, bounded picture of one fleet; ``version`` grows with every change."""

    def __init__(self, topics: Topics, *, verify_key: VerifyKey | None = None) -> None:
        self.topics = topics
        self._verify_key = verify_key
        self._lock = threading.Lock()
        self.version = 0
        self._agents: dict[str, dict[str, Any]] = {}
        self._cameras: dict[str, dict[str, Any]] = {}
        self._rounds: dict[int, dict[str, Any]] = {}
        self._coordinator: dict[str, Any] | None = None
        self._announcement: dict[str, Any] | None = None
        self._privacy: dict[str, Any] | None = None  # the newest DP release's budget
        self.rejected = 0
        self.last_rejection: str | None = None

    def filters(self) -> list[str]:
        """The topic filters the view reads; nothing else is subscribed and nothing published."""
        t = self.topics
        return [
            t.all_agent_statuses(),
            t.all_agent_results(),
            t.coordinator_status(),
            t.round_current(),
            t.all_model_manifests(),
            t.all_update_manifests(),
        ]

    def ingest(self, topic: str, payload: bytes) -> None:
        """Take one message; an empty payload (a cleared retained message) is ignored."""
        if not payload:
            return
        try:
            parsed = self.topics.parse(topic)
            handler = _HANDLERS.get(parsed.kind)
            if handler is None:
                return
            with self._lock:
                handler(self, payload)
                self.version += 1
        except FedgeError as exc:
            with self._lock:
                self.rejected += 1
                self.last_rejection = f"{topic}: {exc.reason}"

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            rounds = [self._rounds[n] for n in sorted(self._rounds)]
            return {
                "version": self.version,
                "now": time.time(),
                "fleet": self.topics.fleet,
                "root": self.topics.root,
                "agents": [dict(self._agents[a]) for a in sorted(self._agents)],
                "coordinator": self._coordinator,
                "round": self._announcement,
                "privacy": self._privacy,
                "history": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rounds],
                "cameras": [dict(self._cameras[c]) for c in sorted(self._cameras)],
                "rejected": self.rejected,
            }

    # handlers, called with the lock held
    def _on_agent_status(self, payload: bytes) -> None:
        status = decode_message(payload, AgentStatus)
        entry = self._agent(status.agent)
        if entry is None:
            return
        capabilities = status.capabilities
        entry.update(
            state=status.state.value,
            since=status.timestamp,
            samples=sum(status.samples_by_label.values()),
            frames=status.frames.model_dump(exclude={"kind", "schema_version"})
            if status.frames
            else None,
        )
        if capabilities is not None:
            entry.update(
                model_version=capabilities.model_version,
                runtime=capabilities.runtime,
                can_train=capabilities.can_train,
            )

    def _on_result(self, payload: bytes) -> None:
        result = decode_message(payload, InferenceResult)
        agent = self._agent(result.agent)
        if agent is not None:
            agent["latency_ms"] = result.timings.total_ms
            agent["results"] = agent.get("results", 0) + 1
            agent["model_version"] = agent.get("model_version") or result.model_version
        if result.source not in self._cameras and len(self._cameras) >= MAX_CAMERAS:
            return
        self._cameras[result.source] = {
            "camera": result.source,
            "agent": result.agent,
            "frame_id": result.frame_id,
            "model_version": result.model_version,
            "timestamp": result.timestamp,
            "latency_ms": result.timings.total_ms,
            "predictions": [
                {"label": p.label, "score": p.score} for p in result.predictions[:MAX_PREDICTIONS]
            ],
            "outputs": len(result.outputs),
        }

    def _on_coordinator_status(self, payload: bytes) -> None:
        status = decode_message(payload, CoordinatorStatus)
        self._coordinator = status.model_dump(mode="json", exclude={"kind", "schema_version"})

    def _on_round(self, payload: bytes) -> None:
        announcement = decode_message(self._signed_body(payload), RoundAnnouncement)
        self._announcement = {
            "round": announcement.round,
            "selected": list(announcement.selected),
            "deadline_at": announcement.deadline_at,
            "issued_at": announcement.issued_at,
            "base_version": announcement.release.version,
            "encoding": announcement.config.update_encoding.value,
        }
        entry = self._round(announcement.round)
        if entry is not None:
            entry["selected"] = len(announcement.selected)
            # What each selected agent downloads: the weights of the release it starts from.
            entry["bytes_down"] = announcement.release.weights.size_bytes * len(
                announcement.selected
            )

    def _on_release(self, payload: bytes) -> None:
        release = decode_message(self._signed_body(payload), ModelRelease)
        entry = self._round(release.round)
        if entry is None:
            return
        entry["version"] = release.version
        if release.metrics is not None:
            entry["accuracy"] = release.metrics.accuracy
            entry["loss"] = release.metrics.loss
        spent = release.privacy
        if spent is not None:
            entry["epsilon"], entry["delta"] = spent.epsilon, spent.delta
            if self._privacy is None or release.round >= self._privacy["round"]:
                self._privacy = {
                    "round": release.round,
                    "epsilon": spent.epsilon,
                    "delta": spent.delta,
                    "target_epsilon": spent.target_epsilon,
                    "rounds": spent.rounds,
                    "noise_multiplier": spent.noise_multiplier,
                    "clip_norm": spent.clip_norm,
                    "accounting": spent.accounting,
                }

    def _on_update(self, payload: bytes) -> None:
        update = decode_message(payload, UpdateComplete)
        entry = self._round(update.round)
        if entry is None:
            return
        sizes: dict[str, int] = entry.setdefault("_updates", {})
        # Keyed by agent: an update sent twice (at-least-once delivery) is counted once.
        sizes[update.agent] = update.update_size_bytes
        entry["updates"] = len(sizes)
        entry["bytes_up"] = sum(sizes.values())

    # helpers
    def _signed_body(self, payload: bytes) -> str:
        signed = decode_signed(payload)
        if self._verify_key is None:
            return signed.body  # display only: the dashboard acts on nothing it reads
        return self._verify_key.verify(signed)

    def _agent(self, agent_id: str) -> dict[str, Any] | None:
        if agent_id not in self._agents and len(self._agents) >= MAX_AGENTS:
            return None
        return self._agents.setdefault(agent_id, {"agent": agent_id, "state": "unknown"})

    def _round(self, number: int) -> dict[str, Any] | None:
        if number not in self._rounds:
            if len(self._rounds) >= MAX_ROUNDS:
                self._rounds.pop(min(self._rounds))
            self._rounds[number] = {"round": number}
        return self._rounds[number]


_HANDLERS = {
    TopicKind.AGENT_STATUS: FleetView._on_agent_status,
    TopicKind.AGENT_RESULTS: FleetView._on_result,
    TopicKind.COORDINATOR_STATUS: FleetView._on_coordinator_status,
    TopicKind.ROUND_CURRENT: FleetView._on_round,
    TopicKind.MODEL_MANIFEST: FleetView._on_release,
    TopicKind.UPDATE_MANIFEST: FleetView._on_update,
}
