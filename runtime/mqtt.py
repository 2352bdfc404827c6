"""The one adapter between paho-mqtt's network thread and the rest of fedge.

Everything above this module deals in ``(topic, bytes)`` only. This module owns:

- connecting to a :class:`BrokerAddress` (``runtime.address``: from ``mqtt://`` or
  ``mqtts://`` URLs, user and password, CA/cert/key);
- a persistent session (clean_session false) so QoS 1 messages wait for us at the broker;
- reconnecting forever with exponential backoff and full jitter, re-subscribing each time;
- TCP_NODELAY on the socket (QoS 1 round trips take ~90 ms with Nagle, ~8 ms without);
- calling handlers with every exception caught and logged, so one bad handler never kills
  the network thread;
- telling a publisher when the broker acknowledged its QoS 1 message.

Only MQTT 3.1.1 is used on the wire, so the embedded broker and any clustered broker work.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from protocol.errors import ConfigError, TransportError
from runtime.address import BrokerAddress, Will, parse_broker_url
from runtime.failures import record_handler_failure

__all__ = [
    "BrokerAddress",
    "MqttLink",
    "Will",
    "parse_broker_url",
]

logger = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 15.0
KEEPALIVE_S = 30
LOOP_TIMEOUT_S = 0.1
DEFAULT_MAX_INFLIGHT = 32

MessageHandler = Callable[[str, bytes], None]
AckCallback = Callable[[], None]


def backoff_delay_s(attempt: int, *, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [min, min(max, min * 2**attempt)].

    Not paho's ``reconnect_delay_set``: whole seconds and no jitter, so a fleet that lost
    its broker reconnects in lockstep. Not tenacity or backoff: this loop also drives
    paho's network loop and must stop at once on shutdown; the delay is the only part
    they would take over.
    """
    ceiling = min(RECONNECT_MAX_S, RECONNECT_MIN_S * (2 ** min(attempt, 20)))
    return rng.uniform(RECONNECT_MIN_S, max(RECONNECT_MIN_S, ceiling))


class MqttLink:
    """A persistent, self-healing MQTT connection running in its own thread.

    ``on_message(topic, payload)`` runs in the network thread: keep it quick and hand
    real work to a queue. ``on_connected(session_present)`` runs after every (re)connect,
    after the subscriptions were renewed.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        on_message: MessageHandler | None = None,
        on_connected: Callable[[bool], None] | None = None,
        will: Will | None = None,
        clean_session: bool = False,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self._on_message = on_message
        self._on_connected = on_connected
        self._rng = random.Random()  # noqa: S311 - jitter, not secrecy; unseeded so agents differ
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._settled = threading.Event()  # connected and every SUBSCRIBE acknowledged
        self._pending_subscribes: set[int] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._pending_acks: dict[int, AckCallback] = {}
        self._early_acks: set[int] = set()
        self._early_subacks: set[int] = set()
        self.connect_count = 0

        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        client.max_inflight_messages_set(DEFAULT_MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        if address.username:
            client.username_pw_set(address.username, address.password)
        if address.tls:
            self._configure_tls(client, address)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_socket_open = _set_tcp_nodelay
        # Writes happen on the network thread only: without this, paho (which does not know
        # our thread runs its loop) writes a publish from the caller's thread straight into
        # the socket, racing the network thread, which garbles TLS records.
        client.on_socket_register_write = _leave_writes_to_the_loop
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        self._client = client

    # lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._client.connect_async(self.address.host, self.address.port, keepalive=KEEPALIVE_S)
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> None:
        """Wait until connected and every subscription so far is acknowledged by the broker."""
        if not self._settled.wait(timeout_s):
            detail = f": {self._last_error}" if self._last_error else ""
            raise TransportError(
                f"could not connect to {self.address.redacted()} within {timeout_s:g} s{detail}",
                reason="unreachable",
            )

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, *, graceful: bool = True, timeout_s: float = 5.0) -> None:
        """Disconnect and end the thread. ``graceful=False`` drops the socket so the LWT fires."""
        self._stopping.set()
        if graceful and self._connected.is_set():
            self._client.disconnect()
        elif not graceful:
            sock = self._client.socket()
            if isinstance(sock, socket.socket):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    logger.debug("socket already closed while dropping the link")
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._connected.clear()
        self._settled.clear()

    # subscriptions and publishing
    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self._connected.is_set():
            self._track_subscribe(self._client.subscribe(topic_filter, qos))

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        on_ack: AckCallback | None = None,
    ) -> None:
        """Queue a message; ``on_ack`` runs once the broker acknowledged it (QoS 1).

        While disconnected, QoS 1 messages wait in paho's queue and go out (again) on
        reconnect; the agent's outbox covers a restart of the process itself.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        # NO_CONN and CONN_LOST: the message stays queued in paho and goes out on reconnect.
        queued = {
            MQTTErrorCode.MQTT_ERR_SUCCESS,
            MQTTErrorCode.MQTT_ERR_NO_CONN,
            MQTTErrorCode.MQTT_ERR_CONN_LOST,
        }
        if info.rc not in queued:
            raise TransportError(f"publish to {topic!r} refused: {paho.error_string(info.rc)}")
        callback = on_ack or _nothing
        # The broker's ack may come back before publish() returned the message id.
        with self._lock:
            acked_early = info.mid in self._early_acks
            if acked_early:
                self._early_acks.discard(info.mid)
            else:
                self._pending_acks[info.mid] = callback
        if acked_early:
            _call_safely(callback, "ack callback")

    # paho callbacks (network thread)
    def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stopping.is_set():
            if not first:
                delay_s = backoff_delay_s(attempt, rng=self._rng)
                attempt += 1
                logger.info("reconnecting to %s in %.2f s", self.address.redacted(), delay_s)
                if self._stopping.wait(delay_s):
                    break
            first = False
            connects_before = self.connect_count
            try:
                self._client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                self._last_error = str(exc)
                logger.warning("cannot reach %s: %s", self.address.redacted(), exc)
                continue
            while not self._stopping.is_set():
                code = self._client.loop(timeout=LOOP_TIMEOUT_S)
                if code != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if self.connect_count > connects_before:
                attempt = 0
            self._connected.clear()
            self._settled.clear()
        # Let a graceful DISCONNECT go out before the socket closes.
        for _ in range(10):
            if self._client.loop(timeout=0.01) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break

    def _handle_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._last_error = f"broker refused the connection: {reason}"
            logger.error("broker %s refused the connection: %s", self.address.redacted(), reason)
            return
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        self._connected.set()
        if subscriptions:
            self._track_subscribe(client.subscribe(subscriptions))
        else:
            self._settled.set()
        self.connect_count += 1
        session_present = bool(getattr(_flags, "session_present", False))
        logger.info(
            "connected to %s as %s (session present: %s)",
            self.address.redacted(),
            self.client_id,
            session_present,
        )
        if self._on_connected is not None:
            _call_safely(lambda: self._on_connected(session_present), "on_connected")  # type: ignore[misc]

    def _track_subscribe(self, result: tuple[MQTTErrorCode, int | None]) -> None:
        code, mid = result
        if code != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected after all: the next connect subscribes again
        with self._lock:
            # The SUBACK may have come back before subscribe() returned its message id.
            if mid in self._early_subacks:
                self._early_subacks.discard(mid)
                return
            self._pending_subscribes.add(mid)
            self._settled.clear()

    def _handle_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: Any, _props: Any
    ) -> None:
        failures = [reason for reason in reasons if reason.is_failure]
        if failures:
            logger.error("broker refused a subscription: %s", failures)
        with self._lock:
            if mid in self._pending_subscribes:
                self._pending_subscribes.discard(mid)
            else:
                self._early_subacks.add(mid)
            if not self._pending_subscribes and self._connected.is_set():
                self._settled.set()

    def _handle_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._settled.clear()
        with self._lock:
            self._pending_subscribes.clear()
            self._early_subacks.clear()
        if was_connected and not self._stopping.is_set():
            logger.warning("lost connection to %s: %s", self.address.redacted(), reason)

    def _handle_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message is None:
            return
        topic, payload = msg.topic, bytes(msg.payload)
        _call_safely(lambda: self._on_message(topic, payload), f"handler for {topic}")  # type: ignore[misc]

    def _handle_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _props: Any
    ) -> None:
        with self._lock:
            callback = self._pending_acks.pop(mid, None)
            if callback is None:
                self._early_acks.add(mid)
        if callback is not None:
            _call_safely(callback, "ack callback")

    @staticmethod
    def _configure_tls(client: paho.Client, address: BrokerAddress) -> None:
        for path in (address.ca_file, address.cert_file, address.key_file):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        try:
            client.tls_set(
                ca_certs=str(address.ca_file) if address.ca_file else None,
                certfile=str(address.cert_file) if address.cert_file else None,
                keyfile=str(address.key_file) if address.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise ConfigError(f"TLS set-up failed: {exc}") from exc


def _leave_writes_to_the_loop(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    return None


def _set_tcp_nodelay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        logger.debug("TCP_NODELAY not available on this socket")


def _call_safely(function: Callable[[], object], what: str) -> None:
    """The last resort: a handler's exception stops here, so the network thread lives on.

    Handlers are meant to answer every message themselves (an ack or an error event); an
    exception that gets this far is a bug, logged and recorded as such.
    """
    try:
        function()
    except Exception as exc:
        logger.exception("%s failed; the connection carries on", what)
        record_handler_failure(what, exc)


def _nothing() -> None:
    return None
