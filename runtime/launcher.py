"""Broker processes on a free loopback port: Mosquitto and fedge's embedded broker.

Used by the test suite and by the benchmarks, so it lives in the installed package:

- :class:`runtime.mosquitto.MosquittoProcess`: the real broker, with a config written into
  its own directory (see ``runtime.mosquitto.mosquitto_config`` for every setting and why).
- :class:`AmqttProcess`: fedge's embedded broker (``python -m runtime.broker``) as a
  subprocess, which keeps amqtt's asyncio machinery out of the caller's process.

Both answer to the same shape: ``host``, ``port``, ``url``, ``username``, ``password``
(``None`` for Mosquitto, which admits anonymous clients), ``start()``, ``stop()``,
``kill()``, ``restart()``, ``log_text()``. Readiness is an MQTT CONNECT/CONNACK handshake,
not a bare TCP probe, which amqtt logs as an error.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from protocol.errors import TransportError

__all__ = [
    "AMQTT_PASSWORD",
    "AMQTT_USERNAME",
    "LOOPBACK",
    "START_TIMEOUT_S",
    "WAIT_TIMEOUT_S",
    "AmqttProcess",
    "BrokerEndpoint",
    "BrokerProcess",
    "BrokerStartError",
    "free_port",
    "read_text",
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
AMQTT_USERNAME = "fedge"
AMQTT_PASSWORD = "fedge-test-secret"  # noqa: S105 - a throwaway local broker's

_CONNACK_ACCEPTED = 0
_MQTT_LEVEL_311 = 4
_CONNECT_CLEAN_SESSION = 0x02
_CONNECT_PASSWORD = 0x40
_CONNECT_USERNAME = 0x80
_HANDSHAKE_KEEPALIVE_S = 10


class BrokerStartError(TransportError):
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
        return read_text(self.output_path)

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


class AmqttProcess(BrokerProcess):
    """fedge's embedded broker (amqtt) as ``python -m runtime.broker``.

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
            "runtime.broker",
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
