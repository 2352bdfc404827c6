"""The coordinator daemon: MQTT link, fleet, round runner, commands and status.

Rounds run in one worker thread; commands are answered at once. A restarted coordinator
republishes the current release and resumes the plan and the round it was in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.metrics import RoundMeter
from coordinator.mqtt_fleet import MqttFleet
from coordinator.plans import plan_from_command
from coordinator.private_rounds import REFUSED_REASON
from coordinator.recovery import RetainedKeeper, expected_retained
from coordinator.rounds import RoundOutcome, RoundPlan, RoundRunner
from coordinator.state import CoordinatorState
from coordinator.status_feed import PrivacySpentReader, StatusPacer
from coordinator.task_commands import start_task
from coordinator.task_metrics import TaskMeter
from coordinator.task_producers import make_producer
from coordinator.task_resume import check_resumable
from coordinator.task_runs import TaskRuns, task_defaults
from coordinator.tasks import builtin_task, load_task
from protocol.errors import FedgeError, MessageError
from protocol.messages.agent import CommandAck
from protocol.messages.base import Message
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.commands import Ping, RequestStatus, StartRounds, StopRounds
from protocol.messages.rounds import CoordinatorState as Phase
from protocol.messages.rounds import CoordinatorStatus
from protocol.signing import SigningKey, load_signing_key, write_key_pair
from runtime.command_screen import CommandScreen
from runtime.metrics import MetricsServer, new_registry
from runtime.mqtt import MqttLink, Will

__all__ = ["Coordinator", "plan_from_command"]

logger = logging.getLogger(__name__)

COMMAND_TYPES = (StartRounds, StopRounds, Ping, RequestStatus)
MAX_COMMAND_BYTES = 64 * 1024
OUTCOMES_KEPT = 256  # in memory, for months of rounds; the state keeps every one


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.topics = config.topics
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.state = CoordinatorState(config.data_dir / "coordinator.sqlite")
        self.signing_key = _signing_key(config)
        self._screen = CommandScreen(
            config,
            refuse=lambda reason, text: self.fleet.report_error(reason, text),  # noqa: PLW0108 - made below
            answer=lambda ack: self.link.publish(self.topics.coordinator_events(), ack),
        )
        address = config.broker_address()
        offline = CoordinatorStatus(state=Phase.OFFLINE, timestamp=0.0)
        self.link = MqttLink(
            address,
            client_id=f"fedge-coordinator-{config.fleet}",
            on_message=self._on_message,
            on_connected=self._on_connected,
            will=Will(self.topics.coordinator_status(), encode_message(offline)),
        )
        self.fleet = MqttFleet(
            self.link,
            self.topics,
            self.signing_key,
            max_chunk_bytes=config.max_chunk_bytes,
            on_command=self._on_command,
        )
        self.task = load_task(config.task) if config.task else builtin_task(config.model_name)
        self.producer = make_producer(self.task, config=config, state=self.state)
        check_resumable(self.task, self.state, self.producer.initial_weights, config.data_dir)
        self.metrics = new_registry()
        self._meter = RoundMeter(self.metrics, current_round=self.state.last_round_number())
        self.metrics_server = None
        if config.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics, port=config.metrics_port)
        self.runner = RoundRunner(
            fleet=self.fleet,
            state=self.state,
            producer=self.producer,
            on_progress=self._on_progress,
            on_outcome=self._meter.outcome,
        )
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._progress: dict[str, Any] = {}
        self._privacy = PrivacySpentReader()
        self._pacer = StatusPacer()
        self.outcomes: deque[RoundOutcome] = deque(maxlen=OUTCOMES_KEPT)
        self.keeper = RetainedKeeper(
            expected_retained=lambda: expected_retained(self.state, self.runner, self.topics),
            republish=self._republish_retained,
            resend_blob=self._resend_blob,
        )
        self.fleet.on_own_retained = self.keeper.on_retained
        # Tasks run at once beside the fleet's own (coordinator.task_runs), each on its topics.
        self.tasks = TaskRuns(
            config=config,
            link=self.link,
            signing_key=self.signing_key,
            registry=self.fleet,
            on_change=lambda: self._publish_status(self._phase()),
            on_outcome=TaskMeter(self.metrics).outcome,
        )
        self.fleet.on_stalled_blob = self.keeper.on_stalled_blob

    # lifecycle
    def start(self, *, wait_connected_s: float = 30.0) -> None:
        if self.metrics_server is not None:
            self.metrics_server.start()
        # Read before connecting: a command arriving meanwhile must not look like a crash.
        pending = self.runner.pending_plan()
        self.fleet.subscribe()
        self.link.start()
        self.link.wait_connected(wait_connected_s)
        release = self.runner.republish_current()
        logger.info("coordinator up; current model %s", release.version)
        self._publish_status(Phase.IDLE)
        if pending is not None:
            logger.info("resuming an unfinished plan of %d rounds", pending.rounds)
            self._start_plan(pending)
        self._ready.set()

    def stop(self) -> None:
        self._stopping.set()
        self.keeper.stop()
        self.runner.request_stop()
        worker = self._worker
        if worker is not None:
            worker.join(30.0)
        self.tasks.close()
        if self.link.is_connected:
            done = threading.Event()
            offline = CoordinatorStatus(state=Phase.OFFLINE, timestamp=time.time())
            self.link.publish(
                self.topics.coordinator_status(),
                encode_message(offline),
                retain=True,
                on_ack=done.set,
            )
            done.wait(2.0)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.link.stop()
        self.state.close()

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stopping.wait(self.config.status_interval_s):
                self._publish_status(self._phase())
        finally:
            self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def run_tasks_now(self, plans: dict[str, RoundPlan]) -> dict[str, list[RoundOutcome]]:
        """Run several tasks' plans at once (scripts, benchmarks); returns each one's outcomes."""
        outcomes = self.tasks.run_now(plans)
        self._publish_status(self._phase())
        return outcomes

    def run_plan_now(self, plan: RoundPlan) -> list[RoundOutcome]:
        """Run a plan in the calling thread (scripts and benchmarks)."""
        outcomes = self.runner.run_plan(plan)
        self.outcomes.extend(outcomes)
        self._publish_status(Phase.IDLE)
        return outcomes

    # messages
    def _on_message(self, topic: str, payload: bytes) -> None:
        self.fleet.on_message(topic, payload)
        self.tasks.on_message(topic, payload)

    def _on_connected(self, session_present: bool) -> None:
        self._publish_status(self._phase())
        if self._ready.is_set():  # start() publishes the release after the first connect
            self.keeper.on_connected(session_present)

    def _resend_blob(self, digest: str) -> bool:
        """A blob of ours an agent could not fetch, published again; False if not ours."""
        if self._stopping.is_set():
            return False  # the state is closing
        try:
            data = self.state.blob(digest)
        except FedgeError:
            return False  # not a blob this coordinator holds: nothing to resend
        self.fleet.republish_blob(digest, data)
        return True

    def _republish_retained(self, _why: str) -> None:
        """Everything retained the coordinator owns: release, blobs, announcement, status."""
        if self._stopping.is_set():
            return  # the state is closing; the next start publishes all of it anyway
        self.fleet.forget_published()
        self.runner.republish_current()
        announcement = self.runner.open_announcement()
        if announcement is not None:
            self.fleet.announce(announcement)
        self.tasks.republish()
        self._publish_status(self._phase())

    def _on_command(self, topic: str, payload: bytes) -> None:
        admitted = self._screen.admit(topic, payload)
        if admitted is None:
            return
        try:
            command = decode_message(admitted, COMMAND_TYPES, max_bytes=MAX_COMMAND_BYTES)
        except MessageError as exc:
            self.fleet.report_error(exc.reason, f"command on {topic} refused: {exc}")
            return
        try:
            detail = self._handle(command)
        except FedgeError as exc:
            self._ack(command, ok=False, reason=exc.reason, message=str(exc))
            return
        except Exception as exc:
            # A bug, but the sender still gets an answer (and the log the traceback).
            logger.exception("command %s failed", command.kind)  # type: ignore[attr-defined]
            self._ack(command, ok=False, reason="internal", message=str(exc)[:1024])
            return
        self._ack(command, ok=True, detail=detail)

    def _handle(self, command: Message) -> dict[str, str | int | float | bool | None]:
        if isinstance(command, StartRounds):
            if not self._ready.is_set():
                raise FedgeError(
                    "the coordinator is still starting; try again in a few seconds",
                    reason="starting",
                )
            if command.task is not None:
                if self.busy:
                    raise FedgeError("the fleet's own rounds are running", reason="busy")
                return start_task(self.tasks, command, record=self.state)
            plan = plan_from_command(command, defaults=self._round_defaults())
            # The fleet's own rounds take every agent: never beside a task's, which share them.
            if self.busy or self.tasks.busy:
                raise FedgeError("rounds are already running; stop them first", reason="busy")
            self._start_plan(plan)
            return {
                "rounds": plan.rounds,
                "strategy": plan.strategy,
                "next_round": self.state.last_round_number() + 1,
            }
        if isinstance(command, StopRounds):
            who = command.requested_by or "an unnamed sender"
            why = f"stop_rounds {command.command_id} from {who} ({command.reason})"
            if command.task is not None:
                return {"stopping": self.tasks.stop(command.task, why)}
            self.runner.request_stop(why)
            return {"stopping": self.tasks.stop(None, why) or self.busy}
        online = sum(1 for a in self.fleet.agents().values() if a.online)
        return {
            "agents_online": online,
            "round": self.state.last_round_number(),
            "busy": self.busy,
            "pong": isinstance(command, Ping),
        }

    def _round_defaults(self) -> dict[str, Any]:
        if self.config.task is None:
            return {}  # the built-in models keep the round config's own defaults
        return task_defaults(self.task)

    def _ack(
        self,
        command: Message,
        *,
        ok: bool,
        reason: str | None = None,
        message: str | None = None,
        detail: dict[str, str | int | float | bool | None] | None = None,
    ) -> None:
        ack = CommandAck.answering(command, ok=ok, reason=reason, message=message, detail=detail)
        self.link.publish(self.topics.coordinator_events(), encode_message(ack))

    # rounds
    def _start_plan(self, plan: RoundPlan) -> None:
        with self._worker_lock:
            if self.busy:
                raise FedgeError("rounds are already running", reason="busy")
            self.runner = RoundRunner(
                fleet=self.fleet,
                state=self.state,
                producer=self.producer,
                on_progress=self._on_progress,
                on_outcome=self._meter.outcome,
            )
            self._worker = threading.Thread(
                target=self._run_plan, args=(plan,), name="coordinator-rounds", daemon=True
            )
            self._worker.start()

    def _run_plan(self, plan: RoundPlan) -> None:
        try:
            outcomes = self.runner.run_plan(plan)
            self.outcomes.extend(outcomes)
            if outcomes and outcomes[-1].privacy_stop:
                self.fleet.report_error(REFUSED_REASON, f"rounds stopped: {outcomes[-1].reason}")
        except FedgeError as exc:
            logger.error("rounds stopped: %s", exc)  # noqa: TRY400 - the reason says it all
            self.fleet.report_error(exc.reason, f"rounds stopped: {exc}")
        except Exception:
            logger.exception("rounds failed")
        finally:
            self._publish_status(Phase.IDLE)

    def _on_progress(self, progress: dict[str, Any]) -> None:
        self._meter.progress(progress)
        self._progress = progress
        if self._pacer.due(progress):
            self._publish_status(Phase.ANNOUNCED)

    def _phase(self) -> Phase:
        return Phase.ANNOUNCED if self.busy or self.tasks.busy else Phase.IDLE

    def _publish_status(self, phase: Phase) -> None:
        progress = self._progress if phase is Phase.ANNOUNCED else {}
        version = self.state.get("current_version")
        spent = self._privacy.spent(self.state)
        status = CoordinatorStatus(
            state=phase,
            timestamp=time.time(),
            round=progress.get("round") or self.state.last_round_number() or None,
            model_version=version,
            agents_online=sum(1 for a in self.fleet.agents().values() if a.online),
            updates_received=progress.get("received", 0),
            selected=progress.get("selected", 0),
            detail=_detail(progress, self.state),
            left_out=progress.get("left_out", {}),
            epsilon=spent[0] if spent else None,
            delta=spent[1] if spent else None,
            tasks=self.tasks.statuses(),
        )
        self.link.publish(self.topics.coordinator_status(), encode_message(status), retain=True)


def _detail(progress: dict[str, Any], state: CoordinatorState) -> str | None:
    if progress:
        kilobytes = progress.get("bytes_up", 0) / 1000
        return f"{progress['seconds_left']:.0f} s left, {kilobytes:.1f} kB of updates in"
    done = [r for r in state.rounds() if r.state == "done"]
    if done and done[-1].metrics.get("accuracy") is not None:
        return f"round {done[-1].round} accuracy {done[-1].metrics['accuracy']:.3f}"
    return None


def _signing_key(config: CoordinatorConfig) -> SigningKey:
    path = config.signing_key_path
    if not path.exists() and config.signing_key is None:
        private, public = write_key_pair(path.parent, name=path.stem)
        logger.warning("generated a signing key %s; give agents %s", private, public)
    return load_signing_key(path)
