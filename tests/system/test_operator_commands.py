"""Operator-signed commands through a real Mosquitto, to agent and coordinator processes.

Both daemons run with ``operator_keys`` set. A plain client plays operator and stranger:
a signed command is answered ok; an unsigned, a forged (another key, or a changed text), a
replayed and a stale one are each refused with their reason, as an error event and as the
refusing acknowledgement of that command id; and the daemon goes on serving. The CLI
(``fedge agent send``, ``fedge round stop``) signs with ``--operator-key`` and is refused
without it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from fedge.cli import cli
from fedge.harness.federation import federation
from protocol.messages.agent import AgentState, AgentStatus, ErrorEvent
from protocol.messages.base import Message
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.commands import Ping, RequestStatus, StopRounds
from protocol.messages.rounds import CoordinatorStatus
from protocol.operator import sign_command
from protocol.signing import SignedMessage, SigningKey, load_signing_key, write_key_pair
from protocol.topics import Topics
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    publish,
    subscribe,
)
from tests.system.answers import ack_for, decoded

pytestmark = [pytest.mark.broker, pytest.mark.system]

ANSWER_TIMEOUT_S = 60.0
AGENT = "agent-00"


def _refused(collector: MessageCollector, command_id: str, reason: str) -> None:
    """Refused with ``reason``: the command's acknowledgement and an error event say so."""
    ack = ack_for(collector, command_id)
    assert (ack.ok, ack.reason) == (False, reason), ack

    def evented(messages: list[Received]) -> bool:
        return any(
            isinstance(m, ErrorEvent) and m.reason == reason and command_id in m.message
            for m in decoded(messages)
        )

    collector.wait_for(evented, ANSWER_TIMEOUT_S)


def _forged(payload: bytes) -> bytes:
    """The operator's envelope with its text changed after signing."""
    signed = decode_message(payload, SignedMessage)
    return encode_message(signed.model_copy(update={"body": signed.body.replace("x-", "y-")}))


def _exercise(
    client: mqtt.Client,
    collector: MessageCollector,
    topic: str,
    operator: SigningKey,
    command: Callable[[str], Message],
) -> None:
    """Signed, unsigned, foreign-signed, tampered, replayed and stale; then signed again."""
    ids = {name: f"x-{name}-{uuid.uuid4().hex[:6]}" for name in ("ok", "plain", "other", "old")}
    signed = sign_command(operator, command(ids["ok"]), topic=topic, now=time.time())
    publish(client, topic, signed)
    assert ack_for(collector, ids["ok"]).ok
    publish(client, topic, encode_message(command(ids["plain"])))
    _refused(collector, ids["plain"], "unsigned_command")
    stranger = SigningKey.generate()
    foreign = sign_command(stranger, command(ids["other"]), topic=topic, now=time.time())
    publish(client, topic, foreign)
    _refused(collector, ids["other"], "bad_signature")
    tampered = _forged(sign_command(operator, command("x-t"), topic=topic, now=time.time()))
    collector.clear()
    publish(client, topic, tampered)
    _refused(collector, "y-t", "bad_signature")
    collector.clear()
    publish(client, topic, signed)  # the very same envelope again
    _refused(collector, ids["ok"], "stale_command")
    stale = sign_command(operator, command(ids["old"]), topic=topic, now=time.time() - 3600.0)
    publish(client, topic, stale)
    _refused(collector, ids["old"], "stale_command")
    again = f"x-again-{uuid.uuid4().hex[:6]}"
    publish(client, topic, sign_command(operator, command(again), topic=topic, now=time.time()))
    assert ack_for(collector, again).ok  # still serving


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output + str(result.exception or "")


def test_agent_and_coordinator_admit_only_fresh_operator_signed_commands(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    private, public = write_key_pair(tmp_path / "operator", name="operator")
    operator = load_signing_key(private)
    keys = [str(public)]
    with federation(tmp_path, mosquitto, topics, num_agents=1, operator_keys=keys) as fed:
        collector = MessageCollector()
        client = mqtt_client(mosquitto, collector=collector)
        try:
            for topic_filter in (
                topics.agent_events(AGENT),
                topics.coordinator_events(),
                topics.agent_status(AGENT),
                topics.coordinator_status(),
            ):
                subscribe(client, topic_filter)
            coordinator = fed.start_coordinator_process(operator_keys=keys)

            def ready(messages: list[Received]) -> bool:
                seen = decoded(messages)
                agent_up = any(
                    isinstance(m, AgentStatus) and m.state is AgentState.ONLINE for m in seen
                )
                released = any(isinstance(m, CoordinatorStatus) and m.model_version for m in seen)
                return agent_up and released

            collector.wait_for(ready, ANSWER_TIMEOUT_S * 2)
            _exercise(
                client, collector, topics.agent_commands(AGENT), operator,
                lambda command_id: Ping(command_id=command_id),
            )  # fmt: skip
            _exercise(
                client, collector, topics.coordinator_commands(), operator,
                lambda command_id: RequestStatus(command_id=command_id),
            )  # fmt: skip
            # A stop_rounds signed for the coordinator is no command for the agent.
            misdirected = sign_command(
                operator,
                StopRounds(command_id="x-misdirected"),
                topic=topics.coordinator_commands(),
                now=time.time(),
            )
            publish(client, topics.agent_commands(AGENT), misdirected)
            _refused(collector, "x-misdirected", "bad_signature")
        finally:
            disconnect(client)
        where = ["--broker", mosquitto.url, "--fleet", topics.fleet, "--root", topics.root]
        code, output = _invoke("agent", "send", *where, AGENT, '{"kind": "ping"}')
        assert code != 0
        assert "unsigned_command" in output, output
        code, output = _invoke(
            "agent", "send", *where, "--operator-key", str(private), AGENT, '{"kind": "ping"}'
        )
        assert code == 0, output
        code, output = _invoke("round", "stop", *where)
        assert code != 0
        assert "unsigned_command" in output, output
        code, output = _invoke("round", "stop", *where, "--operator-key", str(private))
        assert code == 0, output
        assert "coordinator stopping" in output
        coordinator.stop()
        for log in (coordinator.log(), fed.agents[0].log()):
            assert "Traceback" not in log, log[-3000:]
