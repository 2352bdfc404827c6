"""What an agent answers: its commands (ping, status, load_model, set_options, label), its status.

A mixin of :class:`agent.daemon.Agent`, kept apart from the daemon's wiring and threads.
Every command gets an acknowledgement, ``ok`` or with a reason; none reaches the link.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from agent.config import AgentConfig
from agent.federated import FederatedClient
from agent.intake import FrameIntake
from agent.metrics import AgentReadings
from agent.model import ServingModel, load_serving_model
from agent.model_files import confined_file
from agent.outbox import Outbox
from agent.pipeline import FrameProcessor, InferenceOptions
from agent.store import SampleStore
from protocol.errors import FedgeError, MessageError
from protocol.messages.agent import (
    AgentState,
    AgentStatus,
    Capabilities,
    CommandAck,
    FrameCounters,
)
from protocol.messages.base import Message
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.commands import (
    LabelFrame,
    LoadModel,
    Ping,
    RequestStatus,
    SetOptions,
)
from protocol.topics import Topics
from runtime import __version__
from runtime.command_screen import CommandScreen
from runtime.mqtt import MqttLink

__all__ = ["AgentCommands", "CommandDetail"]

logger = logging.getLogger("agent.daemon")

CommandDetail = dict[str, str | int | float | bool | None]
MAX_COMMAND_BYTES = 64 * 1024
COMMAND_TYPES = (Ping, RequestStatus, LoadModel, SetOptions, LabelFrame)


class AgentCommands:
    """The command handlers and status of :class:`~agent.daemon.Agent`, which mixes them in."""

    if TYPE_CHECKING:  # what the Agent that mixes this in provides
        config: AgentConfig
        topics: Topics
        intake: FrameIntake
        outbox: Outbox
        store: SampleStore
        federated: FederatedClient | None
        serving: ServingModel | None
        options: InferenceOptions
        processor: FrameProcessor
        link: MqttLink
        errors_emitted: int
        _recent: OrderedDict[str, Any]
        _recent_lock: threading.Lock
        _trainers: list[str]
        _stopping: threading.Event
        _screen: CommandScreen

        def _emit_error(
            self,
            reason: str,
            message: str,
            topic: str | None = None,
            frame_id: str | None = None,
        ) -> None: ...

        def _publish(self, *args: Any, **kwargs: Any) -> None: ...

        def _store_sample(self, image: bytes, label: str, source: str) -> str | None: ...

    def _command_screen(self) -> CommandScreen:
        """Operator signatures on commands, where the configuration asks for them."""
        topic = self.topics.agent_commands(self.config.agent_id)
        return CommandScreen(
            self.config,
            refuse=lambda reason, text: self._emit_error(reason, text, topic),
            answer=lambda ack: self._publish(self.topics.agent_events(self.config.agent_id), ack),
        )

    def _handle_command(self, topic: str, payload: bytes) -> None:
        admitted = self._screen.admit(topic, payload)
        if admitted is None:
            return
        try:
            command = decode_message(admitted, COMMAND_TYPES, max_bytes=MAX_COMMAND_BYTES)
        except MessageError as exc:
            self._emit_error(exc.reason, f"command refused: {exc}", topic)
            return
        handler = self._handlers[type(command)]
        try:
            detail = handler(self, command)
        except FedgeError as exc:
            self._ack(command, ok=False, reason=exc.reason, message=str(exc))
            return
        except Exception as exc:
            logger.exception("command %s failed", command.kind)  # type: ignore[attr-defined]
            self._ack(command, ok=False, reason="internal", message=str(exc))
            return
        self._ack(command, ok=True, detail=detail)

    def _ack(
        self,
        command: Message,
        *,
        ok: bool,
        reason: str | None = None,
        message: str | None = None,
        detail: CommandDetail | None = None,
    ) -> None:
        ack = CommandAck.answering(command, ok=ok, reason=reason, message=message, detail=detail)
        self._publish(self.topics.agent_events(self.config.agent_id), encode_message(ack))

    def _on_ping(self, _command: Ping) -> CommandDetail:
        return {"pong": True, "agent": self.config.agent_id}

    def _on_status(self, _command: RequestStatus) -> CommandDetail:
        self._publish_status()
        counts = self.intake.counts
        return {
            "model_version": self.serving.version if self.serving else None,
            # The served .tflite's hash (None for a model served in parts, backbone then head).
            "model_sha256": getattr(self.serving.model, "sha256", None) if self.serving else None,
            "received": counts.received,
            "processed": counts.processed,
            "dropped_stale": counts.dropped_stale,
            "dropped_rate": counts.dropped_rate,
            "rejected": counts.rejected,
            "outbox": len(self.outbox),
            "outbox_dropped": self.outbox.dropped,
            "samples": sum(self.store.counts().values()),
        }

    def _on_load_model(self, command: LoadModel) -> CommandDetail:
        if command.path is None:
            raise FedgeError(
                "load_model needs a path on the agent (fleet versions arrive with rounds)",
                reason="bad_command",
            )
        roots, limit = self.config.effective_models_dirs, self.config.max_model_bytes
        path = confined_file(command.path, roots, max_bytes=limit, what="model")
        labels = None
        if command.labels_path:
            labels = confined_file(command.labels_path, roots, max_bytes=limit, what="labels")
        preprocess = _sibling(path, "preprocess.json")
        if preprocess is not None:
            preprocess = confined_file(str(preprocess), roots, max_bytes=limit, what="spec")
        serving = load_serving_model(
            path,
            version=command.version or path.stem,
            labels_path=labels,
            preprocess_path=preprocess,
            num_threads=self.config.num_threads,
            runtime=None if self.config.runtime == "auto" else self.config.runtime,
        )
        previous = self.serving.version if self.serving else None
        self.serving = serving  # the swap: the worker picks it up with its next frame
        self._publish_status()
        return {"model_version": serving.version, "previous": previous}

    def _on_set_options(self, command: SetOptions) -> CommandDetail:
        fields = ("top_k", "threshold", "detection_threshold", "max_objects", "iou_threshold")
        changes = {f: getattr(command, f) for f in fields if getattr(command, f) is not None}
        self.options = replace(self.options, **changes)
        if command.max_fps is not None:
            self.intake.set_max_fps(command.max_fps)
        detail: CommandDetail = {f: getattr(self.options, f) for f in fields}
        return detail | {"max_fps": self.intake.max_fps}

    def _on_label(self, command: LabelFrame) -> CommandDetail:
        with self._recent_lock:
            recent = self._recent.get(command.frame_id)
        if recent is None or (command.source is not None and command.source != recent.source):
            raise FedgeError(
                f"frame {command.frame_id!r} is not among the last "
                f"{self.config.recent_frames} frames",
                reason="unknown_frame",
            )
        reason = self._store_sample(recent.image, command.label, recent.source)
        if reason is not None:
            raise FedgeError(f"sample not stored: {reason}", reason=reason)
        self._publish_status()
        return {"frame_id": command.frame_id, "label": command.label}

    _handlers: ClassVar[dict[type[Message], Callable[..., CommandDetail]]] = {
        Ping: _on_ping,
        RequestStatus: _on_status,
        LoadModel: _on_load_model,
        SetOptions: _on_set_options,
        LabelFrame: _on_label,
    }

    # outgoing
    def _status(self, state: AgentState) -> AgentStatus:
        counts = self.intake.counts
        return AgentStatus(
            agent=self.config.agent_id,
            state=state,
            timestamp=time.time(),
            capabilities=Capabilities(
                runtime=self._runtime_name(),
                can_train=self.federated is not None,
                trainers=tuple(self._trainers),
                agent_version=__version__,
                model_version=self.serving.version if self.serving else None,
            ),
            samples_by_label=self.store.counts(),
            frames=FrameCounters(
                received=counts.received,
                processed=counts.processed,
                dropped_stale=counts.dropped_stale,
                dropped_rate=counts.dropped_rate,
                rejected=counts.rejected,
            ),
            resident_bytes=resident_bytes(),
            waiting_for=self.federated.waiting_for if self.federated is not None else None,
            stalled_blob=self.federated.stalled_blob if self.federated is not None else None,
            variant=self.federated.variant_choice if self.federated is not None else None,
            personalisation=self.federated.personalisation if self.federated is not None else None,
        )

    def _readings(self) -> AgentReadings:
        return AgentReadings(
            counts=self.intake.counts,
            errors=lambda: self.errors_emitted,
            outbox_size=lambda: len(self.outbox),
            outbox_dropped=lambda: self.outbox.dropped,
            model_version=lambda: self.serving.version if self.serving else None,
        )

    def _runtime_name(self) -> str:
        if self.serving is None:
            return "none"
        runtime = self.serving.model.runtime
        return f"{runtime.name} {runtime.version}"

    def _publish_status(self) -> None:
        if self._stopping.is_set():
            return
        status = self._status(AgentState.ONLINE)
        # Status is retained state, not an event: the newest wins, so no outbox row.
        self.link.publish(
            self.topics.agent_status(self.config.agent_id), encode_message(status), retain=True
        )


def _sibling(path: Path, name: str) -> Path | None:
    candidate = path.with_name(name)
    return candidate if candidate.is_file() else None


def resident_bytes() -> int | None:
    """This process's resident memory, from /proc (Linux); None where there is none."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
