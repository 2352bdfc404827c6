"""Hostile input to a running coordinator through a real Mosquitto: every message answered.

Each case here was once silent (the message reached the MQTT link's last-resort handler,
which the ``handler_failures`` fixture now turns into a failure) or believed a payload's
own claim of who sent it. A plain paho client plays the stranger; the coordinator runs in
this process, so its fleet registry can be inspected directly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from coordinator.config import load_coordinator_config
from coordinator.daemon import Coordinator
from protocol.messages.agent import AgentState, AgentStatus, Capabilities, ErrorEvent
from protocol.messages.codec import encode_message
from protocol.messages.rounds import UpdateComplete, UpdateEncoding
from protocol.signing import write_key_pair
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

ANSWER_TIMEOUT_S = 30.0

Stranger = tuple[mqtt.Client, MessageCollector]


@pytest.fixture(scope="module")
def module_topics() -> Topics:
    return Topics(root=f"t-hostile-{uuid.uuid4().hex[:8]}", fleet="test")


@pytest.fixture(scope="module")
def coordinator(
    mosquitto: MosquittoProcess, module_topics: Topics, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("hostile-coordinator")
    private, _public = write_key_pair(root / "keys")
    config = load_coordinator_config(
        broker_url=mosquitto.url,
        fleet=module_topics.fleet,
        topic_root=module_topics.root,
        data_dir=root / "data",
        signing_key=private,
        status_interval_s=3600.0,
    )
    running = Coordinator(config)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def stranger(mosquitto: MosquittoProcess, module_topics: Topics) -> Iterator[Stranger]:
    """A plain client that watches the coordinator's events; ``(client, collector)``."""
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    subscribe(client, module_topics.coordinator_events())
    try:
        yield client, collector
    finally:
        disconnect(client)


def _error_naming(collector: MessageCollector, reason: str, needle: str) -> ErrorEvent:
    def seen(messages: list[Received]) -> bool:
        return any(
            isinstance(m, ErrorEvent) and m.reason == reason and needle in m.message
            for m in decoded(messages)
        )

    messages = collector.wait_for(seen, ANSWER_TIMEOUT_S)
    return next(
        m
        for m in decoded(messages)
        if isinstance(m, ErrorEvent) and m.reason == reason and needle in m.message
    )


def _completion(
    round_number: int, agent: str, *, size_bytes: int, chunk_count: int, chunk_bytes: int
) -> UpdateComplete:
    return UpdateComplete(
        round=round_number,
        agent=agent,
        base_model_version="r0",
        update_sha256="0" * 64,
        update_size_bytes=size_bytes,
        chunk_count=chunk_count,
        chunk_bytes=chunk_bytes,
        encoding=UpdateEncoding.FLOAT32,
        num_examples=3,
    )


# --- finding 1: commands whose options do not fit ----------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"update_encoding": "bogus"},
        {"epochs": "abc"},
        {"learning_rate": "fast"},
        {"augment": "perhaps"},
        {"max_update_norm": "big"},
        {"epochs": 10**30},
        {"mu": "x"},
    ],
    ids=lambda options: next(iter(options)),
)
def test_start_rounds_with_options_that_do_not_fit_is_answered(
    coordinator: Coordinator, module_topics: Topics, stranger: Stranger, options: dict[str, object]
) -> None:
    client, collector = stranger
    command_id = f"rp-{uuid.uuid4().hex[:8]}"
    command: dict[str, object] = {"kind": "start_rounds", "command_id": command_id}
    command["options"] = options
    if "mu" in options:
        command["strategy"] = "fedprox"
    publish(client, module_topics.coordinator_commands(), json.dumps(command).encode())
    ack = ack_for(collector, command_id)
    assert not ack.ok
    assert ack.reason in {"bad_options", "bad_option"}, ack
    assert not coordinator.busy


# --- finding 2: an update completion whose sizes do not describe a blob -------------------


def test_update_completion_with_impossible_chunk_count_is_refused(
    coordinator: Coordinator, module_topics: Topics, stranger: Stranger
) -> None:
    client, collector = stranger
    agent = f"odd-{uuid.uuid4().hex[:6]}"
    complete = _completion(1, agent, size_bytes=1000, chunk_count=2147483648, chunk_bytes=100)
    # Not subscribed to round 1 unless a round runs: follow it as a resumed round would.
    coordinator.fleet._follow_round(1)
    coordinator.link.wait_connected(ANSWER_TIMEOUT_S)  # the SUBACK is in
    publish(client, module_topics.update_manifest(1, agent), encode_message(complete))
    event = _error_naming(collector, "bad_manifest", agent)
    assert "chunk_count" in event.message


# --- finding 3: identity from the topic -----------------------------------------------------


def _status(agent: str) -> AgentStatus:
    return AgentStatus(
        agent=agent,
        state=AgentState.ONLINE,
        timestamp=1.0,
        capabilities=Capabilities(runtime="x", can_train=True, trainers=("litert",)),
    )


def test_a_status_claiming_another_agent_is_refused(
    coordinator: Coordinator, module_topics: Topics, stranger: Stranger
) -> None:
    client, collector = stranger
    honest, phantom = f"a-{uuid.uuid4().hex[:6]}", f"phantom-{uuid.uuid4().hex[:6]}"
    publish(client, module_topics.agent_status(honest), encode_message(_status(phantom)))
    event = _error_naming(collector, "wrong_agent", phantom)
    assert honest in event.message
    publish(client, module_topics.agent_status(honest), encode_message(_status(honest)))
    collector.clear()
    # A ping is answered after the statuses before it were handled (one network thread).
    ping_id = f"ping-{uuid.uuid4().hex[:6]}"
    ping = {"kind": "ping", "command_id": ping_id}
    publish(client, module_topics.coordinator_commands(), json.dumps(ping).encode())
    ack_for(collector, ping_id)
    known = coordinator.fleet.agents()
    assert honest in known
    assert phantom not in known
    publish(client, module_topics.agent_status(honest), b"", retain=True)


def test_an_update_completion_claiming_another_agent_is_refused(
    coordinator: Coordinator, module_topics: Topics, stranger: Stranger
) -> None:
    client, collector = stranger
    sender, victim = f"s-{uuid.uuid4().hex[:6]}", f"v-{uuid.uuid4().hex[:6]}"
    complete = _completion(2, victim, size_bytes=10, chunk_count=1, chunk_bytes=10)
    coordinator.fleet._follow_round(2)
    coordinator.link.wait_connected(ANSWER_TIMEOUT_S)  # the SUBACK is in
    publish(client, module_topics.update_manifest(2, sender), encode_message(complete))
    event = _error_naming(collector, "wrong_agent", victim)
    assert sender in event.message


# --- finding 5: a round ended by stop_rounds says so, and who asked ------------------------


def test_a_round_ended_by_stop_rounds_says_so_and_who_asked(
    coordinator: Coordinator,
    module_topics: Topics,
    stranger: Stranger,
    mosquitto: MosquittoProcess,
) -> None:
    client, collector = stranger
    silent = f"silent-{uuid.uuid4().hex[:6]}"
    publish(client, module_topics.agent_status(silent), encode_message(_status(silent)))
    collector.clear()
    start_id, stop_id = f"start-{uuid.uuid4().hex[:6]}", f"stop-{uuid.uuid4().hex[:6]}"
    start = {"kind": "start_rounds", "command_id": start_id, "rounds": 3, "deadline_s": 600}
    publish(client, module_topics.coordinator_commands(), json.dumps(start).encode())
    assert ack_for(collector, start_id).ok
    # The round is open once its announcement is retained; the silent agent never answers.
    announced = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=announced)
    try:
        subscribe(watcher, module_topics.round_current())
        announced.wait_for(bool, ANSWER_TIMEOUT_S)
    finally:
        disconnect(watcher)
    stop = {
        "kind": "stop_rounds",
        "command_id": stop_id,
        "reason": "maintenance",
        "requested_by": "ops@hub",
    }
    publish(client, module_topics.coordinator_commands(), json.dumps(stop).encode())
    assert ack_for(collector, stop_id).detail["stopping"] is True
    worker = coordinator._worker  # the rounds thread ends with the plan
    assert worker is not None
    worker.join(ANSWER_TIMEOUT_S)
    assert not coordinator.busy
    outcome = coordinator.outcomes[-1]
    # What was recorded first (it once read "quorum not reached by the extended deadline").
    record = coordinator.state.round(outcome.round)
    assert record is not None
    assert record.reason is not None
    assert "quorum" not in record.reason, record.reason
    assert stop_id in record.reason
    assert "ops@hub" in record.reason
    assert "maintenance" in record.reason
    assert record.state == "stopped"
    assert not outcome.ok
    assert outcome.stopped
    assert record.reason == outcome.reason
    assert len([o for o in coordinator.outcomes if o.round >= outcome.round]) == 1  # no next
    publish(client, module_topics.agent_status(silent), b"", retain=True)
