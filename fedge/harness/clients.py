"""paho clients for tests and benchmarks: connected, acknowledged, waited on explicitly.

:func:`mqtt_client` returns a connected paho client (MQTT 3.1.1, TCP_NODELAY, network loop
running); :func:`subscribe` and :func:`publish` return only once the broker acknowledged;
:class:`MessageCollector` lets a caller wait for what it expects. Not for the daemons: they
talk through ``runtime.mqtt.MqttLink``.
"""

from __future__ import annotations

import socket
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from runtime.launcher import BrokerEndpoint

__all__ = [
    "MessageCollector",
    "Received",
    "Will",
    "disconnect",
    "drop_connection",
    "mqtt_client",
    "publish",
    "subscribe",
]

CONNECT_TIMEOUT_S = 10.0
ACK_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05


# --- clients -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    """A last will for :func:`mqtt_client`."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Received:
    """One message as a subscriber saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class MessageCollector:
    """Thread-safe record of received messages that tests wait on explicitly.

    Attach with ``mqtt_client(..., collector=collector)`` (or ``client.on_message =
    collector.on_message``), then ``collector.wait_for(lambda msgs: ..., timeout_s)``.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._messages: list[Received] = []

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = Received(message.topic, bytes(message.payload), message.qos, message.retain)
        with self._condition:
            self._messages.append(received)
            self._condition.notify_all()

    @property
    def messages(self) -> list[Received]:
        with self._condition:
            return list(self._messages)

    def on_topic(self, topic: str) -> list[Received]:
        return [message for message in self.messages if message.topic == topic]

    def clear(self) -> None:
        with self._condition:
            self._messages.clear()

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = WAIT_TIMEOUT_S
    ) -> list[Received]:
        """Wait until ``predicate(messages)`` holds; return the messages, else fail loudly."""
        with self._condition:
            if self._condition.wait_for(lambda: predicate(list(self._messages)), timeout_s):
                return list(self._messages)
            summary = [(m.topic, len(m.payload), m.qos, m.retain) for m in self._messages]
        raise AssertionError(
            f"condition not met within {timeout_s:.1f} s; received (topic, bytes, qos, "
            f"retain): {summary}"
        )

    def wait_for_topic(
        self, topic: str, count: int = 1, timeout_s: float = WAIT_TIMEOUT_S
    ) -> list[Received]:
        """Wait until at least ``count`` messages arrived on ``topic``; return those."""
        self.wait_for(lambda messages: sum(m.topic == topic for m in messages) >= count, timeout_s)
        return self.on_topic(topic)


class _ClientState:
    """What the helpers track per client: the CONNACK and acknowledged SUBSCRIBEs."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.connack: ReasonCode | None = None
        self.subacks: dict[int, list[ReasonCode]] = {}

    def on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        with self.condition:
            self.connack = reason
            self.condition.notify_all()

    def on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        props: Any,
    ) -> None:
        with self.condition:
            self.subacks[mid] = list(reasons)
            self.condition.notify_all()


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # QoS 1 round trips wait on Nagle plus delayed ACKs without this (about 90 ms each).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _state(client: mqtt.Client) -> _ClientState:
    state = client.user_data_get()
    if not isinstance(state, _ClientState):
        raise TypeError("this client was not made by tests.brokers.mqtt_client()")
    return state


def mqtt_client(
    broker: BrokerEndpoint,
    client_id: str | None = None,
    clean_session: bool = True,
    *,
    will: Will | None = None,
    collector: MessageCollector | None = None,
    keepalive_s: int = 30,
) -> mqtt.Client:
    """A paho client (MQTT 3.1.1, TCP_NODELAY) connected to ``broker``, loop running.

    Uses the broker's username/password when it has them. Raises ``AssertionError`` if
    the broker refuses the connection or does not answer within ``CONNECT_TIMEOUT_S``.
    The client's userdata belongs to the helpers; use :func:`disconnect` when done.
    """
    state = _ClientState()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
        clean_session=clean_session,
        userdata=state,
        protocol=mqtt.MQTTv311,
    )
    client.on_socket_open = _set_nodelay
    client.on_connect = state.on_connect
    client.on_subscribe = state.on_subscribe
    if collector is not None:
        client.on_message = collector.on_message
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    client.connect(broker.host, broker.port, keepalive=keepalive_s)
    client.loop_start()
    with state.condition:
        answered = state.condition.wait_for(lambda: state.connack is not None, CONNECT_TIMEOUT_S)
        connack = state.connack
    if not answered or connack is None or connack.is_failure:
        client.disconnect()
        client.loop_stop()
        raise AssertionError(
            f"broker {broker.host}:{broker.port} did not accept {client_id!r}: "
            f"{connack if answered else 'no CONNACK'}"
        )
    return client


def subscribe(
    client: mqtt.Client, topic_filter: str, qos: int = 1, timeout_s: float = ACK_TIMEOUT_S
) -> None:
    """Subscribe and return once the broker granted the subscription (SUBACK)."""
    state = _state(client)
    result, mid = client.subscribe(topic_filter, qos)
    if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
        raise AssertionError(f"subscribe to {topic_filter!r} failed: {result}")
    with state.condition:
        if not state.condition.wait_for(lambda: mid in state.subacks, timeout_s):
            raise AssertionError(f"no SUBACK for {topic_filter!r} within {timeout_s:.1f} s")
        reasons = state.subacks.pop(mid)
    if any(reason.is_failure for reason in reasons):
        raise AssertionError(f"broker refused the subscription to {topic_filter!r}: {reasons}")


def publish(
    client: mqtt.Client,
    topic: str,
    payload: bytes,
    *,
    qos: int = 1,
    retain: bool = False,
    timeout_s: float = ACK_TIMEOUT_S,
) -> None:
    """Publish and return once the broker acknowledged (QoS 1) or the bytes left (QoS 0)."""
    info = client.publish(topic, payload, qos=qos, retain=retain)
    info.wait_for_publish(timeout_s)
    if not info.is_published():
        raise AssertionError(f"publish to {topic!r} not acknowledged within {timeout_s:.1f} s")


def disconnect(client: mqtt.Client) -> None:
    """Clean MQTT disconnect (no last will) and stop the network thread."""
    client.disconnect()
    client.loop_stop()


def drop_connection(client: mqtt.Client) -> None:
    """Drop the client's TCP connection abruptly (RST, no DISCONNECT): the broker sends its will.

    The client is unusable afterwards.
    """
    client.loop_stop()  # paho's thread must not touch the socket, nor reconnect
    sock = client.socket()
    if sock is None:
        raise AssertionError("client has no socket to drop")
    if isinstance(sock, socket.socket):
        # Linger 0 turns close() into a reset: no orderly shutdown the broker could mistake.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
