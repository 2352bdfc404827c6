"""The outside fuzzer in CI: thousands of hostile payloads at a live agent and coordinator.

Both run in this process against a real Mosquitto; ``fedge.harness.fuzz`` publishes random
and mutated-valid payloads on every topic either reads. Properties: every command gets an
ack or an error event; both still answer a ping after every 500 payloads; and (through the
suite's ``logged_errors`` and ``handler_failures`` fixtures) no traceback was logged and
nothing reached the MQTT link's last-resort handler. ``bench/fuzz.py`` runs it longer.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from coordinator.config import load_coordinator_config
from coordinator.daemon import Coordinator
from coordinator.tflite_export import ReferenceModels
from fedge.harness.fuzz import Fuzzer, decoded_message, fleet_targets
from protocol.messages.agent import CommandAck
from protocol.signing import write_key_pair
from protocol.topics import Topics
from tests.agent.agent_helpers import agent_settings, running_agent
from tests.brokers import MessageCollector, MosquittoProcess, disconnect, mqtt_client, publish
from tests.brokers import subscribe as subscribe_to

pytestmark = [pytest.mark.broker, pytest.mark.system]

PAYLOADS = 3000
CHECK_EVERY = 500
ANSWER_TIMEOUT_S = 60.0
AGENT = "pi-1"


def _pinged(collector: MessageCollector, client: object, topic: str, events: str) -> None:
    command_id = f"live-{uuid.uuid4().hex[:8]}"
    publish(client, topic, json.dumps({"kind": "ping", "command_id": command_id}).encode())  # type: ignore[arg-type]

    def answered(messages: list) -> bool:  # type: ignore[type-arg]
        for message in messages:
            if message.topic != events:
                continue
            event = decoded_message(message.payload)
            if isinstance(event, CommandAck) and event.command_id == command_id:
                return True
        return False

    collector.wait_for(answered, ANSWER_TIMEOUT_S)


def test_every_fuzzed_command_is_answered_and_nothing_crashes(
    mosquitto: MosquittoProcess, topics: Topics, reference_models: ReferenceModels, tmp_path: Path
) -> None:
    private, public = write_key_pair(tmp_path / "keys")
    coordinator = Coordinator(
        load_coordinator_config(
            broker_url=mosquitto.url,
            fleet=topics.fleet,
            topic_root=topics.root,
            data_dir=tmp_path / "coordinator",
            signing_key=private,
            status_interval_s=3600.0,
        )
    )
    coordinator.start()
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    try:
        subscribe_to(client, topics.agent_events(AGENT))
        subscribe_to(client, topics.coordinator_events())
        settings = agent_settings(
            mosquitto, topics, tmp_path / "agent", reference_models, coordinator_key=public
        )
        with running_agent(**settings, trainer="litert"):
            coordinator.fleet._follow_round(1)  # the update topics of an open round
            coordinator.link.wait_connected(ANSWER_TIMEOUT_S)
            targets = fleet_targets(topics, agent=AGENT, camera="cam", rounds=(1,))
            fuzzer = Fuzzer(client, targets, seed=20261201)

            def alive(_count: int) -> None:
                _pinged(collector, client, topics.agent_commands(AGENT), topics.agent_events(AGENT))
                _pinged(
                    collector, client, topics.coordinator_commands(), topics.coordinator_events()
                )

            fuzzer.run(PAYLOADS, every=CHECK_EVERY, check=alive)
            alive(PAYLOADS)  # every command before the last ping was handled by now

            def events_of(command_topic: str) -> str:
                if command_topic == topics.coordinator_commands():
                    return topics.coordinator_events()
                return topics.agent_events(AGENT)

            assert fuzzer.published == PAYLOADS
            assert sum(map(len, fuzzer.answers.sent.values())) > 0
            assert fuzzer.answers.missing(collector.messages, events_of) == 0
    finally:
        disconnect(client)
        coordinator.stop()
