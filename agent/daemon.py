"""The edge agent daemon: wires the MQTT link, intake, pipeline, outbox, commands and store.

Threads: paho's network thread only sorts incoming messages (frames to the intake,
commands to a queue); one inference worker takes the latest frame per source; one command
worker answers commands. Everything that must arrive goes through the outbox.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from agent.cleaning import CleaningPolicy, FrameCleaner
from agent.commands import AgentCommands
from agent.config import AgentConfig
from agent.discovery import agent_discovery
from agent.federated import FederatedClient
from agent.intake import FrameIntake, PendingFrame
from agent.metrics import register_agent_metrics
from agent.model import ServingModel, load_serving_model
from agent.outbox import Outbox
from agent.pipeline import FrameProcessor, InferenceOptions
from agent.privacy import LocalDp
from agent.store import SampleStore
from agent.task_clients import TaskClients
from agent.training import available_trainers
from agent.transfer_task import personal_policy
from agent.variant_choice import VariantPolicy
from protocol.errors import ConfigError, FedgeError, TopicError
from protocol.messages.agent import (
    AgentState,
    AgentStatus,
    ErrorEvent,
)
from protocol.messages.codec import encode_message
from protocol.signing import load_verify_key
from protocol.topics import TopicKind, topic_matches
from runtime.metrics import MetricsServer, new_registry
from runtime.mqtt import MqttLink, Will

__all__ = ["Agent"]

logger = logging.getLogger(__name__)

MAX_PENDING_COMMANDS = 256
WORKER_POLL_S = 0.2

CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class _RecentFrame:
    source: str
    image: bytes


class Agent(AgentCommands):
    """One agent process. ``start()`` returns at once; ``stop()`` ends every thread."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = config.topics
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(data_dir / "outbox.sqlite", max_rows=config.outbox_max_rows)
        self.store = SampleStore(data_dir / "samples", max_per_class=config.store_max_per_class)
        self.intake = FrameIntake(max_fps=config.max_fps)
        cleaner = None
        if config.reject_duplicates:
            cleaner = FrameCleaner(CleaningPolicy(duplicate_window_s=config.duplicate_window_s))
        self.processor = FrameProcessor(
            agent_id=config.agent_id, cleaner=cleaner, max_frame_bytes=config.max_frame_bytes
        )
        self.options = InferenceOptions(top_k=config.top_k, threshold=config.threshold)
        self.serving: ServingModel | None = None
        if config.model_path is not None:
            self.serving = load_serving_model(
                config.model_path,
                version=config.model_version,
                labels_path=config.labels_path,
                preprocess_path=config.preprocess_path,
                num_threads=config.num_threads,
                runtime=None if config.runtime == "auto" else config.runtime,
            )
        self._recent: OrderedDict[str, _RecentFrame] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._commands: queue.Queue[tuple[str, bytes]] = queue.Queue(MAX_PENDING_COMMANDS)
        self._stopping = threading.Event()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._in_flight: set[int] = set()
        self._in_flight_lock = threading.Lock()
        self.errors_emitted = 0
        address = config.broker_address()
        offline = AgentStatus(agent=config.agent_id, state=AgentState.OFFLINE, timestamp=0.0)
        self.link = MqttLink(
            address,
            client_id=f"fedge-agent-{config.agent_id}",
            on_message=self._route,
            on_connected=self._on_connected,
            will=Will(self.topics.agent_status(config.agent_id), encode_message(offline)),
        )
        self._command_topic = self.topics.agent_commands(config.agent_id)
        self._screen = self._command_screen()
        self._frame_filters = config.effective_frame_topics
        self.federated = self._federated_client()
        # Tasks a multi-task coordinator runs at once, each on its own topics.
        self.tasks = TaskClients(self.federated) if self.federated is not None else None
        self.metrics = new_registry()
        self._frame_seconds = register_agent_metrics(self.metrics, self._readings())
        self.metrics_server = None
        if config.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics, port=config.metrics_port)
        self._discovery = []
        if config.home_assistant_discovery:
            self._discovery = agent_discovery(
                self.topics, config.agent_id, prefix=config.home_assistant_prefix
            )

    # lifecycle
    def start(self, *, wait_connected_s: float | None = None) -> None:
        if self.metrics_server is not None:
            self.metrics_server.start()
        for topic_filter in self._frame_filters:
            self.link.subscribe(topic_filter, qos=0)
        self.link.subscribe(self._command_topic, qos=1)
        # Whatever a previous run left unacknowledged goes out first.
        for item in self.outbox.pending():
            self._send(item.row_id, item.topic, item.payload, retain=item.retain)
        if self.federated is not None:
            self.federated.start()
        if self.tasks is not None:
            self.tasks.start()
        self._spawn(self._inference_worker, "inference")
        self._spawn(self._command_worker, "commands")
        self._spawn(self._status_ticker, "status")
        self.link.start()
        if wait_connected_s is not None:
            self.link.wait_connected(wait_connected_s)
        logger.info(
            "agent %s serving %s on %s",
            self.config.agent_id,
            self.serving.version if self.serving else "no model",
            ", ".join(self._frame_filters),
        )

    def stop(self) -> None:
        # request_stop() (a signal) only asks; this does the work, once.
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self.intake.close()
        if self.link.is_connected:
            offline = self._status(AgentState.OFFLINE)
            done = threading.Event()
            self.link.publish(
                self.topics.agent_status(self.config.agent_id),
                encode_message(offline),
                retain=True,
                on_ack=done.set,
            )
            done.wait(2.0)
        if self.tasks is not None:
            self.tasks.stop()
        if self.federated is not None:
            self.federated.stop()
        for thread in self._threads:
            thread.join(5.0)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.link.stop()
        self.outbox.close()
        self.store.close()

    def run_forever(self) -> None:
        self.start()
        try:
            self._stopping.wait()
        finally:
            self.stop()

    def request_stop(self) -> None:
        self._stopping.set()
        self.intake.close()

    # incoming (network thread: sort only)
    def _route(self, topic: str, payload: bytes) -> None:
        if self.tasks is not None and self.tasks.handles(topic):
            self.tasks.on_message(topic, payload)
            return
        if self.federated is not None and self.federated.handles(topic):
            self.federated.on_message(topic, payload)
            return
        if topic == self._command_topic:
            try:
                self._commands.put_nowait((topic, payload))
            except queue.Full:
                self._emit_error("busy", "too many pending commands; command dropped", topic)
            return
        if any(topic_matches(f, topic) for f in self._frame_filters):
            self.intake.offer(
                PendingFrame(
                    source=self._source_of(topic),
                    topic=topic,
                    payload=payload,
                    received_at=time.time(),
                )
            )

    def _source_of(self, topic: str) -> str:
        try:
            parsed = self.topics.parse(topic)
        except TopicError:
            parsed = None
        if parsed is not None and parsed.kind is TopicKind.CAMERA_FRAMES and parsed.camera:
            return parsed.camera
        # A frame topic outside the fleet layout: the level before the last names it.
        levels = [level for level in topic.split("/") if level]
        candidate = levels[-2] if len(levels) >= 2 else (levels[-1] if levels else "camera")
        cleaned = "".join(c if c.isalnum() or c in "_.-" else "_" for c in candidate)[:64]
        return cleaned or "camera"

    def _on_connected(self, _session_present: bool) -> None:
        # Retained and idempotent: Home Assistant sees the device before its first state.
        for entity in self._discovery:
            self.link.publish(entity.topic, entity.payload, retain=True)
        self._publish_status()

    # inference
    def _inference_worker(self) -> None:
        while not self._stopping.is_set():
            frame = self.intake.take(WORKER_POLL_S)
            if frame is None:
                continue
            serving = self.serving  # one read: a hot swap never splits a frame
            if serving is None:
                self.intake.finish(processed=False)
                self._emit_error("no_model", "no model loaded; frame skipped", frame.topic)
                continue
            try:
                outcome = self.processor.process(frame, serving, self.options)
            except FedgeError as exc:
                self.intake.finish(processed=False)
                self._emit_error(exc.reason, str(exc), frame.topic)
                continue
            except Exception as exc:
                self.intake.finish(processed=False)
                logger.exception("frame from %s failed", frame.topic)
                self._emit_error("internal", f"frame failed: {exc}", frame.topic)
                continue
            self._remember(outcome.meta.frame_id or "", frame.source, outcome.image)
            if outcome.meta.label is not None:
                self._store_sample(outcome.image, outcome.meta.label, frame.source)
            self._publish(
                self.topics.agent_results(self.config.agent_id),
                encode_message(outcome.result),
                droppable=True,
                reliable=self.config.reliable_results,
            )
            self.intake.finish(processed=True)  # counted once the result is queued
            self._frame_seconds.observe(outcome.result.timings.total_ms / 1000.0)

    def _remember(self, frame_id: str, source: str, image: bytes) -> None:
        with self._recent_lock:
            self._recent[frame_id] = _RecentFrame(source, image)
            self._recent.move_to_end(frame_id)
            while len(self._recent) > self.config.recent_frames:
                self._recent.popitem(last=False)

    def _store_sample(self, image: bytes, label: str, source: str) -> str | None:
        """Add a labelled sample; return the rejection reason, if any (also as an event)."""
        try:
            added = self.store.add(image, label=label, source=source)
        except FedgeError as exc:
            self._emit_error(exc.reason, f"sample not stored: {exc}")
            return exc.reason
        if not added.stored:
            reason = added.reason or "rejected"
            self._emit_error(reason, f"sample with label {label!r} not stored: {reason}")
            return reason
        return None

    # commands
    def _command_worker(self) -> None:
        while not self._stopping.is_set():
            try:
                topic, payload = self._commands.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                continue
            self._handle_command(topic, payload)

    def _federated_client(self) -> FederatedClient | None:
        if self.config.coordinator_key is None:
            logger.info("no coordinator key configured: not taking part in federated rounds")
            self._trainers: list[str] = []
            return None
        self._trainers = available_trainers()
        kind = self.config.trainer
        if kind == "auto":
            # LiteRT first: the Keras trainer loads TensorFlow (hundreds of MB resident),
            # which an agent that serves and trains in LiteRT never needs. Keras only
            # when configured, or when nothing else can train here.
            kind = "litert" if "litert" in self._trainers else "keras"
        if kind not in self._trainers:
            raise ConfigError(
                f"trainer {kind!r} is not available here (available: {self._trainers})"
            )
        # Auto: the other trainer takes releases the first cannot train (a Keras-only model).
        fallback = next((k for k in self._trainers if k != kind), None)
        if self.config.trainer != "auto":
            fallback, self._trainers = None, [kind]  # the birth message names only it
        return FederatedClient(
            agent_id=self.config.agent_id,
            topics=self.topics,
            link=self.link,
            publish_reliably=self._publish,
            report_error=self._emit_error,
            store=self.store,
            data_dir=self.config.data_dir / "federated",
            verify_key=load_verify_key(self.config.coordinator_key),
            trainer_kind=kind,
            fallback_trainer=fallback,
            on_swap=self._swap if self.config.follow_fleet_models else None,
            on_waiting=self._publish_status,
            local_dp=self._local_dp(),
            max_chunk_bytes=self.config.max_chunk_bytes,
            variant=VariantPolicy(self.config.variant, self.config.variant_within_points),
            personal=personal_policy(self.config),
        )

    def _local_dp(self) -> LocalDp | None:
        if self.config.local_dp_noise_multiplier is None:
            return None
        ledger = self.config.data_dir / "federated" / "local_dp.json"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        return LocalDp(
            noise_multiplier=self.config.local_dp_noise_multiplier,
            clip_norm=self.config.local_dp_clip_norm,
            delta=self.config.local_dp_delta,
            ledger_path=ledger,
        )

    def _swap(self, serving: ServingModel) -> None:
        self.serving = serving  # the worker picks it up with its next frame
        self._publish_status()

    def _status_ticker(self) -> None:
        while not self._stopping.wait(self.config.status_interval_s):
            if self.link.is_connected:
                self._publish_status()

    def _emit_error(
        self, reason: str, message: str, topic: str | None = None, frame_id: str | None = None
    ) -> None:
        self.errors_emitted += 1
        event = ErrorEvent(
            reason=reason[:1024],
            message=message[:1024],
            topic=topic[:1024] if topic else None,
            frame_id=frame_id,
            timestamp=time.time(),
        )
        logger.info("error event %s: %s", reason, message)
        self._publish(self.topics.agent_events(self.config.agent_id), encode_message(event))

    def _publish(
        self, topic: str, payload: bytes, *, droppable: bool = False, reliable: bool = True
    ) -> None:
        if not reliable:
            self.link.publish(topic, payload, qos=1)
            return
        item = self.outbox.put(topic, payload, droppable=droppable)
        self._send(item.row_id, topic, payload, retain=False)

    def _send(self, row_id: int, topic: str, payload: bytes, *, retain: bool) -> None:
        with self._in_flight_lock:
            if row_id in self._in_flight:
                return
            self._in_flight.add(row_id)

        def acked() -> None:
            self.outbox.ack(row_id)
            with self._in_flight_lock:
                self._in_flight.discard(row_id)

        self.link.publish(topic, payload, qos=1, retain=retain, on_ack=acked)

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(
            target=target,  # type: ignore[arg-type]
            name=f"agent-{name}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)
