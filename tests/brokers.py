"""Real brokers for the tests, and small paho helpers that wait explicitly.

Both brokers run as subprocesses on a free loopback port:

- :class:`MosquittoProcess`: the real broker, with a config written into its own directory
  (see :func:`mosquitto_config` for every setting and why it is there).
- :class:`AmqttProcess`: fedge's embedded broker (``python -m fedge.broker``). A subprocess
  keeps amqtt's asyncio machinery and its warnings out of the pytest process.

Both answer to the same shape: ``host``, ``port``, ``url``, ``username``, ``password``
(``None`` for Mosquitto, which admits anonymous clients), ``start()``, ``stop()``,
``kill()``, ``restart()``, ``log_text()``. Readiness is an MQTT CONNECT/CONNACK handshake,
not a bare TCP probe, which amqtt logs as an error.

Client helpers: :func:`mqtt_client` returns a connected paho client (MQTT 3.1.1,
TCP_NODELAY, network loop running); :func:`subscribe` and :func:`publish` return only once
the broker acknowledged; :class:`MessageCollector` lets a test wait for what it expects.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "AMQTT_PASSWORD",
    "AMQTT_USERNAME",
    "AmqttProcess",
    "BrokerEndpoint",
    "BrokerProcess",
    "BrokerStartError",
    "MessageCollector",
    "MosquittoProcess",
    "Received",
    "Will",
    "disconnect",
    "drop_connection",
    "find_mosquitto",
    "free_port",
    "mosquitto_config",
    "mqtt_client",
    "publish",
    "subscribe",
    "wait_until",
]

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 10.0
ACK_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
HANDSHAKE_TIMEOUT_S = 2.0
MOSQUITTO_MAX_PACKET_BYTES = 64 * 1024 * 1024
MOSQUITTO_MAX_QUEUED_MESSAGES = 100_000
MOSQUITTO_AUTOSAVE_INTERVAL_S = 1
AMQTT_USERNAME = "fedge"
AMQTT_PASSWORD = "fedge-test-secret"

_CONNACK_ACCEPTED = 0
_MQTT_LEVEL_311 = 4
_CONNECT_CLEAN_SESSION = 0x02
_CONNECT_PASSWORD = 0x40
_CONNECT_USERNAME = 0x80
_HANDSHAKE_KEEPALIVE_S = 10


class BrokerStartError(RuntimeError):
    """A broker process that exited or never became ready; the message carries its log."""


class BrokerEndpoint(Protocol):
    """What a client needs to reach a broker (a broker process or an in-process broker)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def username(self) -> str | None: ...

    @property
    def password(self) -> str | None: ...


def wait_until(
    predicate: Callable[[], bool],
    timeout_s: float,
    *,
    what: str,
    interval_s: float = POLL_INTERVAL_S,
) -> None:
    """Poll ``predicate`` until it holds; raise :class:`TimeoutError` naming ``what`` if not.

    For conditions that offer no event to wait on (a port, a file on disk, a process).
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.1f} s waiting for {what}")
        time.sleep(interval_s)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def find_mosquitto() -> Path | None:
    """The mosquitto binary, if installed (it lives in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    candidate = Path("/usr/sbin/mosquitto")
    return candidate if candidate.is_file() else None


def _encode_string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


def _encode_remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    flags = _CONNECT_CLEAN_SESSION
    payload = _encode_string(client_id)
    if username is not None:
        flags |= _CONNECT_USERNAME
        payload += _encode_string(username)
        if password is not None:
            flags |= _CONNECT_PASSWORD
            payload += _encode_string(password)
    variable = (
        _encode_string("MQTT")
        + bytes([_MQTT_LEVEL_311, flags])
        + struct.pack("!H", _HANDSHAKE_KEEPALIVE_S)
    )
    body = variable + payload
    return b"\x10" + _encode_remaining_length(len(body)) + body


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _mqtt_handshake(endpoint: BrokerEndpoint) -> bool:
    """True if the broker answers an MQTT 3.1.1 CONNECT with an accepting CONNACK."""
    packet = _connect_packet(f"probe-{uuid.uuid4().hex[:12]}", endpoint.username, endpoint.password)
    try:
        with socket.create_connection(
            (endpoint.host, endpoint.port), timeout=HANDSHAKE_TIMEOUT_S
        ) as sock:
            sock.sendall(packet)
            connack = _recv_exactly(sock, 4)
            accepted = len(connack) == 4 and connack[0] == 0x20 and connack[3] == _CONNACK_ACCEPTED
            if accepted:
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker sees a clean goodbye
            return accepted
    except OSError:
        return False


class BrokerProcess:
    """A broker subprocess on a fixed port; restarts reuse the port and the work directory."""

    kind = "broker"

    def __init__(self, workdir: Path, *, port: int | None = None, host: str = LOOPBACK) -> None:
        self.workdir = workdir
        self._host = host
        self._port = port if port is not None else free_port(host)
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self.output_path = workdir / f"{self.kind}.out"
        workdir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, pid={self.pid})"

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self._host}:{self._port}"

    @property
    def username(self) -> str | None:
        return None

    @property
    def password(self) -> str | None:
        return None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process once it ended, else ``None``."""
        return self._process.poll() if self._process is not None else None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict[str, str] | None:
        return None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the broker and return once it accepts an MQTT connection."""
        if self.running:
            raise BrokerStartError(f"{self!r} is already running")
        self._close_output()
        self._output = self.output_path.open("ab")
        self._process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout_s
        while not _mqtt_handshake(self):
            if self._process.poll() is not None:
                self._close_output()
                raise BrokerStartError(
                    f"{self.kind} exited with status {self._process.returncode} before it "
                    f"accepted connections on {self.url}:\n{self.log_text()}"
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise BrokerStartError(
                    f"{self.kind} did not accept connections on {self.url} within "
                    f"{timeout_s:.0f} s:\n{self.log_text()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop (SIGTERM) and wait; SIGKILL if it does not exit in time."""
        process = self._process
        if process is None or process.poll() is not None:
            self._close_output()
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise BrokerStartError(
                f"{self.kind} ignored SIGTERM for {timeout_s:.0f} s and was killed"
            ) from None
        finally:
            self._close_output()

    def kill(self) -> None:
        """Crash the broker (SIGKILL): it saves nothing on the way out."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._close_output()

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Graceful stop, then start on the same port with the same state directory."""
        self.stop()
        self.start(timeout_s)

    def log_text(self) -> str:
        """Everything the broker wrote (stdout, stderr and its log file, if separate)."""
        return _read_text(self.output_path)

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def mosquitto_config(
    workdir: Path, port: int, host: str = LOOPBACK, extra_config: Sequence[str] = ()
) -> str:
    """The test broker's mosquitto.conf (Mosquitto 2.0).

    - ``set_tcp_nodelay true``: without it a QoS 1 round trip costs about 90 ms (Nagle plus
      delayed ACKs); clients set TCP_NODELAY on their side too.
    - ``persistence`` with ``autosave_interval 1`` (time-based): Mosquitto compares whole
      seconds strictly, so it rewrites its database about every two seconds, and a SIGKILL
      loses what changed since (measured: a queued message and a retained one published
      1.5 s before a kill were lost, 2 s before they survived). ``autosave_on_changes``
      stays off: it rewrites the whole database after every queued or retained message,
      O(database) per message under chunk traffic. Tests that must not lose anything to a
      kill call :meth:`MosquittoProcess.persist` first; a graceful stop always saves.
    - ``max_packet_size`` 64 MiB: tests throw 20 MB payloads at agents.
    - ``max_inflight_messages 0`` (no limit) and ``max_queued_messages 100000``: the broker
      never drops QoS 1 messages queued for a slow or offline test client.
    - ``user``: as root, Mosquitto would otherwise switch to the ``mosquitto`` user and
      lose access to its own work directory.

    ``extra_config`` lines come last; for a single-valued option such as
    ``max_packet_size`` the last occurrence wins, so they override the settings above.
    """
    return "\n".join(
        [
            f"listener {port} {host}",
            "allow_anonymous true",
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "set_tcp_nodelay true",
            "persistence true",
            f"persistence_location {workdir}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {MOSQUITTO_AUTOSAVE_INTERVAL_S}",
            "autosave_on_changes false",
            f"max_packet_size {MOSQUITTO_MAX_PACKET_BYTES}",
            "max_inflight_messages 0",
            f"max_queued_messages {MOSQUITTO_MAX_QUEUED_MESSAGES}",
            "max_queued_bytes 0",
            f"log_dest file {workdir}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            *extra_config,
            "",
        ]
    )


class MosquittoProcess(BrokerProcess):
    """Mosquitto with persistence in ``workdir``; see :func:`mosquitto_config`."""

    kind = "mosquitto"

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        extra_config: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, port=port, host=host)
        self.binary = binary
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.database_path = workdir / "mosquitto.db"
        self.config_path.write_text(
            mosquitto_config(workdir, self.port, host, extra_config), encoding="utf-8"
        )

    def _command(self) -> list[str]:
        return [str(self.binary), "-c", str(self.config_path)]

    def log_text(self) -> str:
        return _read_text(self.output_path) + _read_text(self.log_path)

    def _database_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.database_path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns)

    def persist(self, timeout_s: float = WAIT_TIMEOUT_S) -> None:
        """Make Mosquitto write its database now (SIGUSR1) and wait until it is on disk.

        Mosquitto is single-threaded: a message it acknowledged before this call is in
        memory, and any database write that starts afterwards contains it. The write goes
        to a new file renamed over the old one, so a new (inode, mtime) marks a finished
        write.
        """
        process = self._process
        if process is None or process.poll() is not None:
            raise BrokerStartError(f"{self!r} is not running")
        before = self._database_stamp()
        process.send_signal(signal.SIGUSR1)
        wait_until(
            lambda: self._database_stamp() not in {None, before},
            timeout_s,
            what=f"mosquitto to write {self.database_path}",
        )


class AmqttProcess(BrokerProcess):
    """fedge's embedded broker (amqtt) as ``python -m fedge.broker``.

    Clients must send ``username``/``password``; state lives in memory only, so a restart
    (graceful or not) forgets sessions and retained messages.
    """

    kind = "amqtt"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        username: str = AMQTT_USERNAME,
        password: str = AMQTT_PASSWORD,
    ) -> None:
        super().__init__(workdir, port=port, host=host)
        self._username = username
        self._password = password

    @property
    def username(self) -> str:
        return self._username

    @property
    def password(self) -> str:
        return self._password

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fedge.broker",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--username",
            self._username,
        ]

    def _environment(self) -> dict[str, str]:
        # The password travels in the environment, not on a command line others can read.
        return {**os.environ, "FEDGE_BROKER_PASSWORD": self._password}


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
