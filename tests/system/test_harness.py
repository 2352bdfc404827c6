"""The test harness itself: both brokers do what the rest of the suite relies on."""

from __future__ import annotations

import logging
import random
import re
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from protocol.errors import TransportError
from protocol.topics import Topics, validate_id
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

REPO_ROOT = Path(__file__).resolve().parents[2]
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


# --- fixtures --------------------------------------------------------------------------


def test_unique_root_names_the_test(unique_root: str, topics: Topics) -> None:
    assert re.fullmatch(r"t-test_unique_root_names_the_test-[0-9a-f]{8}", unique_root)
    assert topics.root == unique_root
    assert topics.fleet == "test"


@pytest.mark.parametrize("label", ["x" * 100 + "[weird/param#+]"])
def test_unique_root_stays_short_and_safe(unique_root: str, label: str) -> None:
    assert len(unique_root) <= 64
    assert validate_id(unique_root) == unique_root
    assert Topics(root=unique_root, fleet="test").agent_status("a").startswith(unique_root + "/")


@pytest.mark.allow_logged_errors
def test_logged_errors_are_recorded_from_any_thread(logged_errors: list[logging.LogRecord]) -> None:
    def fail_and_log() -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("tests.harness").exception("handler failed")

    worker = threading.Thread(target=fail_and_log)
    worker.start()
    worker.join()
    assert [record.getMessage() for record in logged_errors] == ["handler failed"]


def _run_inner_pytest(tmp_path: Path, inner: Path) -> subprocess.CompletedProcess[str]:
    """Run one test file under this suite's conftest only, as a separate pytest."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            "/dev/null",
            str(inner),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def test_a_logged_exception_fails_an_unmarked_test(tmp_path: Path) -> None:
    inner = tmp_path / "test_inner.py"
    inner.write_text(
        textwrap.dedent(
            """
            import logging

            import pytest

            def test_hides_a_failure():
                try:
                    1 / 0
                except ZeroDivisionError:
                    logging.getLogger("inner").exception("swallowed")

            @pytest.mark.allow_logged_errors
            def test_expects_it():
                try:
                    1 / 0
                except ZeroDivisionError:
                    logging.getLogger("inner").exception("expected")

            def test_logs_without_traceback():
                logging.getLogger("inner").error("plain error, no exception")
            """
        ),
        encoding="utf-8",
    )
    result = _run_inner_pytest(tmp_path, inner)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 passed, 1 error" in result.stdout, result.stdout
    assert "ERROR at teardown of test_hides_a_failure" in result.stdout
    assert "exceptions were logged during the test" in result.stdout
    assert "swallowed" in result.stdout


def test_a_handler_failure_fails_the_test_even_in_a_child_process(tmp_path: Path) -> None:
    """The ``handler_failures`` guard: no marker silences it, and it sees child processes."""
    inner = tmp_path / "test_inner_handlers.py"
    inner.write_text(
        textwrap.dedent(
            """
            import subprocess
            import sys
            import threading

            import pytest

            from runtime.mqtt import MqttLink, parse_broker_url

            CHILD = '''
            import sys, threading
            from runtime.mqtt import MqttLink, parse_broker_url
            called = threading.Event()
            def handler(topic, payload):
                called.set()
                raise ValueError("child handler bug")
            link = MqttLink(parse_broker_url(sys.argv[1]), client_id="inner-child",
                            on_message=handler, clean_session=True)
            link.subscribe("inner/child", qos=1)
            link.start()
            link.wait_connected(30)
            link.publish("inner/child", b"x", qos=1)
            assert called.wait(30)
            link.stop()
            '''

            def _link(url, handler, client_id):
                link = MqttLink(parse_broker_url(url), client_id=client_id,
                                on_message=handler, clean_session=True)
                link.subscribe(f"inner/{client_id}", qos=1)
                link.start()
                link.wait_connected(30)
                return link

            @pytest.mark.allow_logged_errors
            def test_in_process(mosquitto):
                called = threading.Event()
                def handler(topic, payload):
                    called.set()
                    raise ValueError("in-process handler bug")
                link = _link(mosquitto.url, handler, "inner-here")
                link.publish("inner/inner-here", b"x", qos=1)
                assert called.wait(30)
                link.stop()

            def test_in_a_child(mosquitto):
                subprocess.run([sys.executable, "-c", CHILD, mosquitto.url], check=True,
                               timeout=60)

            def test_answered(mosquitto):
                called = threading.Event()
                link = _link(mosquitto.url, lambda topic, payload: called.set(), "inner-ok")
                link.publish("inner/inner-ok", b"x", qos=1)
                assert called.wait(30)
                link.stop()
            """
        ),
        encoding="utf-8",
    )
    result = _run_inner_pytest(tmp_path, inner)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 passed, 2 errors" in result.stdout, result.stdout
    assert "ERROR at teardown of test_in_process" in result.stdout
    assert "ERROR at teardown of test_in_a_child" in result.stdout
    assert "in-process handler bug" in result.stdout
    assert "child handler bug" in result.stdout
