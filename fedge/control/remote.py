"""Talking to a running coordinator from any machine with broker access."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedge.control.interrupts import StopSignals
from protocol.errors import FedgeError, TransportError
from protocol.messages.agent import CommandAck
from protocol.messages.base import Message
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.rounds import CoordinatorStatus
from protocol.operator import sign_command
from protocol.signing import SigningKey
from protocol.topics import Topics
from runtime.mqtt import BrokerAddress, MqttLink

__all__ = ["send_command", "show_status"]

CONNECT_TIMEOUT_S = 10.0
ACK_TIMEOUT_S = 15.0
STATUS_TIMEOUT_S = 5.0


def _link(broker: BrokerAddress, on_message: Callable[[str, bytes], None]) -> MqttLink:
    client_id = f"fedge-cli-{uuid.uuid4().hex[:8]}"
    return MqttLink(broker, client_id=client_id, clean_session=True, on_message=on_message)


def send_command(
    broker: BrokerAddress,
    *,
    command_topic: str,
    events_topic: str,
    command: Message,
    operator_key: SigningKey | None = None,
) -> CommandAck:
    """Publish ``command`` and return its acknowledgement (from the coordinator or an agent).

    With ``operator_key`` the command goes out signed for ``command_topic``, with the
    time and a fresh nonce (protocol.operator), as fleets that require it expect.
    """
    answer: list[CommandAck] = []
    arrived = threading.Event()
    command_id = command.command_id  # type: ignore[attr-defined]

    def on_message(_topic: str, payload: bytes) -> None:
        try:
            message: Message = decode_message(payload)
        except FedgeError:
            return
        if isinstance(message, CommandAck) and message.command_id == command_id:
            answer.append(message)
            arrived.set()

    link = _link(broker, on_message)
    link.subscribe(events_topic, qos=1)
    link.start()
    try:
        link.wait_connected(CONNECT_TIMEOUT_S)
        payload = encode_message(command)
        if operator_key is not None:
            payload = sign_command(operator_key, command, topic=command_topic, now=time.time())
        link.publish(command_topic, payload, qos=1)
        if not arrived.wait(ACK_TIMEOUT_S):
            raise TransportError(
                f"no answer within {ACK_TIMEOUT_S:g} s: is the coordinator (or agent) "
                "running on this broker and fleet?",
                reason="no_answer",
            )
    finally:
        link.stop()
    return answer[0]


def _table(status: CoordinatorStatus | None) -> Table:
    table = Table(title="fedge coordinator")
    for column in ("state", "round", "model", "agents online", "selected", "updates", "detail"):
        table.add_column(column)
    if status is None:
        table.add_row("no status yet", "", "", "", "", "", "")
    else:
        table.add_row(
            status.state.value,
            str(status.round or "-"),
            status.model_version or "-",
            str(status.agents_online),
            str(status.selected),
            str(status.updates_received),
            _with_privacy(status),
        )
        for name, task in sorted(status.tasks.items()):  # tasks run at once, one row each
            accuracy = f"accuracy {task.accuracy:.3f}" if task.accuracy is not None else ""
            table.add_row(
                f"{name}: {task.state.value}",
                str(task.round or "-"),
                task.model_version or "-",
                f"{task.agents} given",
                str(task.selected),
                str(task.updates_received),
                "; ".join(d for d in (task.detail, accuracy) if d),
            )
        for agent, why in sorted(status.left_out.items()):  # no trainer that fits the model
            table.add_row(f"{agent}: left out", "", "", "", "", "", why)
    return table


def _with_privacy(status: CoordinatorStatus) -> str:
    if status.epsilon is None:
        return status.detail or ""
    spent = f"DP: epsilon {status.epsilon:.3g} at delta {status.delta:g}"
    return f"{status.detail}; {spent}" if status.detail else spent


def show_status(broker: BrokerAddress, topics: Topics, *, console: Console, watch: bool) -> None:
    latest: list[CoordinatorStatus] = []
    changed = threading.Event()

    def on_message(_topic: str, payload: bytes) -> None:
        try:
            latest.append(decode_message(payload, CoordinatorStatus))
        except FedgeError:
            return
        changed.set()

    link = _link(broker, on_message)
    link.subscribe(topics.coordinator_status(), qos=1)
    link.start()
    try:
        link.wait_connected(CONNECT_TIMEOUT_S)
        if not changed.wait(STATUS_TIMEOUT_S):
            raise TransportError(
                "no coordinator status on this broker and fleet yet", reason="no_status"
            )
        if not watch:
            console.print(_table(latest[-1]))
            return
        with (
            StopSignals() as stops,
            Live(_table(latest[-1]), console=console, refresh_per_second=4) as live,
        ):
            stops.on_stop(changed.set)
            shown = None
            while not stops.requested:
                if not console.is_terminal and latest[-1] is not shown:
                    # Piped to a file or a log: a table per change instead of a live view.
                    shown = latest[-1]
                    console.print(_table(shown))
                changed.clear()
                changed.wait(1.0)
                live.update(_table(latest[-1]))
        stops.exit_if_interrupted()
    finally:
        link.stop()
