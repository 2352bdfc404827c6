"""The test harness itself: both brokers do what the rest of the suite relies on."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from protocol.errors import TransportError
from protocol.topics import Topics
from runtime.broker import EmbeddedBroker
from tests.brokers import (
    AmqttProcess,
    BrokerEndpoint,
    BrokerProcess,
    MessageCollector,
    MosquittoProcess,
    Will,
    disconnect,
    drop_connection,
    free_port,
    mqtt_client,
    publish,
    subscribe,
)

BIG_PAYLOAD_BYTES = 5 * 1024 * 1024
BIG_PAYLOAD_TIMEOUT_S = 120.0
SUBPROCESS_TIMEOUT_S = 120.0


@pytest.fixture(params=["mosquitto", "amqtt_broker"])
def broker(request: pytest.FixtureRequest) -> BrokerProcess:
    fixture: BrokerProcess = request.getfixturevalue(request.param)
    return fixture


def _send_to_offline_session(broker: BrokerProcess, topics: Topics, client_id: str) -> str:
    """Subscribe a persistent session, leave, publish one QoS 1 message to it; return topic."""
    topic = topics.agent_commands("sleeper")
    subscriber = mqtt_client(broker, client_id=client_id, clean_session=False)
    subscribe(subscriber, topic, qos=1)
    disconnect(subscriber)
    publisher = mqtt_client(broker)
    publish(publisher, topic, b"while you were away", qos=1)
    disconnect(publisher)
    return topic


def _resume_session(broker: BrokerProcess, client_id: str, topic: str) -> None:
    """Reconnect the persistent session without subscribing again: the queued message arrives."""
    collector = MessageCollector()
    subscriber = mqtt_client(broker, client_id=client_id, clean_session=False, collector=collector)
    try:
        (message,) = collector.wait_for_topic(topic)
    finally:
        disconnect(subscriber)
    assert message.payload == b"while you were away"
    assert message.qos == 1


def _assert_retained(broker: BrokerProcess, topic: str, payload: bytes) -> None:
    collector = MessageCollector()
    client = mqtt_client(broker, collector=collector)
    try:
        subscribe(client, topic, qos=1)
        (message,) = collector.wait_for_topic(topic)
    finally:
        disconnect(client)
    assert message.payload == payload
    assert message.retain


# --- both brokers ----------------------------------------------------------------------


@pytest.mark.broker
def test_retained_message_reaches_a_later_subscriber(broker: BrokerProcess, topics: Topics) -> None:
    topic = topics.coordinator_status()
    publisher = mqtt_client(broker)
    publish(publisher, topic, b"online", qos=1, retain=True)
    disconnect(publisher)

    _assert_retained(broker, topic, b"online")


@pytest.mark.broker
def test_qos1_round_trip(broker: BrokerProcess, topics: Topics) -> None:
    topic = topics.agent_results("a1")
    collector = MessageCollector()
    subscriber = mqtt_client(broker, collector=collector)
    publisher = mqtt_client(broker)
    try:
        subscribe(subscriber, topic, qos=1)
        for index in range(3):
            publish(publisher, topic, f"result {index}".encode(), qos=1)
        messages = collector.wait_for_topic(topic, count=3)
    finally:
        disconnect(publisher)
        disconnect(subscriber)
    assert [m.payload for m in messages] == [b"result 0", b"result 1", b"result 2"]
    assert {m.qos for m in messages} == {1}
    assert not any(m.retain for m in messages)


@pytest.mark.broker
def test_qos1_to_offline_persistent_session_is_delivered_on_reconnect(
    broker: BrokerProcess, topics: Topics
) -> None:
    client_id = f"{topics.root}-sleeper"
    topic = _send_to_offline_session(broker, topics, client_id)

    _resume_session(broker, client_id, topic)


@pytest.mark.broker
def test_last_will_is_published_when_the_socket_drops(
    broker: BrokerProcess, topics: Topics
) -> None:
    status = topics.agent_status("doomed")
    collector = MessageCollector()
    observer = mqtt_client(broker, collector=collector)
    try:
        subscribe(observer, status, qos=1)
        doomed = mqtt_client(broker, will=Will(status, b"offline", qos=1))
        drop_connection(doomed)
        (will,) = collector.wait_for_topic(status)
    finally:
        disconnect(observer)
    assert will.payload == b"offline"


@pytest.mark.broker
def test_a_5mb_payload_arrives_intact(broker: BrokerProcess, topics: Topics) -> None:
    topic = topics.camera_frames("big")
    payload = random.Random(5).randbytes(BIG_PAYLOAD_BYTES)
    collector = MessageCollector()
    subscriber = mqtt_client(broker, collector=collector)
    publisher = mqtt_client(broker)
    try:
        subscribe(subscriber, topic, qos=1)
        publish(publisher, topic, payload, qos=1, timeout_s=BIG_PAYLOAD_TIMEOUT_S)
        (message,) = collector.wait_for_topic(topic, timeout_s=BIG_PAYLOAD_TIMEOUT_S)
    finally:
        disconnect(publisher)
        disconnect(subscriber)
    assert message.payload == payload


# --- Mosquitto persistence -------------------------------------------------------------


@pytest.mark.broker
def test_graceful_restart_keeps_retained_and_queued_messages(
    fresh_mosquitto: MosquittoProcess, topics: Topics
) -> None:
    retained = topics.round_current()
    publisher = mqtt_client(fresh_mosquitto)
    publish(publisher, retained, b"round 7", qos=1, retain=True)
    disconnect(publisher)
    client_id = f"{topics.root}-sleeper"
    queued = _send_to_offline_session(fresh_mosquitto, topics, client_id)

    fresh_mosquitto.stop()
    assert fresh_mosquitto.returncode == 0
    fresh_mosquitto.start()

    _assert_retained(fresh_mosquitto, retained, b"round 7")
    _resume_session(fresh_mosquitto, client_id, queued)


@pytest.mark.broker
def test_kill_after_persist_keeps_queued_messages(
    fresh_mosquitto: MosquittoProcess, topics: Topics
) -> None:
    client_id = f"{topics.root}-sleeper"
    queued = _send_to_offline_session(fresh_mosquitto, topics, client_id)
    fresh_mosquitto.persist()

    fresh_mosquitto.kill()
    assert fresh_mosquitto.returncode == -9
    fresh_mosquitto.start()

    _resume_session(fresh_mosquitto, client_id, queued)


# --- the embedded broker ---------------------------------------------------------------


@dataclass(frozen=True)
class _Endpoint:
    host: str
    port: int
    username: str | None
    password: str | None


@pytest.mark.broker
@pytest.mark.parametrize(
    ("username", "password"), [(None, None), ("fedge", "wrong"), ("intruder", None)]
)
def test_embedded_broker_refuses_wrong_credentials(
    amqtt_broker: AmqttProcess, username: str | None, password: str | None
) -> None:
    stranger = _Endpoint(amqtt_broker.host, amqtt_broker.port, username, password)
    with pytest.raises(AssertionError, match="Not authorized"):
        mqtt_client(stranger)


def _subscribe_and_receive(broker: BrokerEndpoint, topic: str) -> mqtt.Client:
    """A client that subscribed and received a QoS 1 message: the hard case for a shutdown."""
    collector = MessageCollector()
    client = mqtt_client(broker, collector=collector)
    subscribe(client, topic, qos=1)
    publish(client, topic, b"echo", qos=1)
    collector.wait_for_topic(topic)
    return client


@pytest.mark.broker
def test_embedded_broker_process_stops_cleanly_with_a_client_connected(
    tmp_path: Path, topics: Topics
) -> None:
    broker = AmqttProcess(tmp_path)
    broker.start()
    try:
        client = _subscribe_and_receive(broker, topics.coordinator_events())
        broker.stop()
        client.loop_stop()
    finally:
        broker.kill()
    assert broker.returncode == 0
    log = broker.log_text()
    assert "Traceback" not in log
    assert "Warning" not in log


@pytest.mark.broker
def test_embedded_broker_in_process_serves_and_stops(topics: Topics) -> None:
    embedded = EmbeddedBroker(port=free_port(), username="u", password="p")
    with embedded:
        assert embedded.url == f"mqtt://127.0.0.1:{embedded.port}"
        client = _subscribe_and_receive(embedded, topics.coordinator_events())
    client.loop_stop()
    with pytest.raises(ConnectionRefusedError):
        mqtt_client(embedded)


@pytest.mark.broker
def test_embedded_broker_on_a_taken_port_says_so(amqtt_broker: AmqttProcess) -> None:
    with pytest.raises(TransportError, match="already in use") as caught:
        EmbeddedBroker(amqtt_broker.host, amqtt_broker.port).start()
    assert caught.value.reason == "port_in_use"

    result = subprocess.run(
        [sys.executable, "-m", "runtime.broker", "--port", str(amqtt_broker.port)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 1
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr
