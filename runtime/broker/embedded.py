"""The embedded MQTT broker: amqtt, in a background thread or as a process of its own.

``fedge demo`` runs it when no broker is given; anything real should use Mosquitto.
amqtt speaks MQTT 3.1.1 only, which is all fedge's wire protocol needs.

Credentials: every client must connect with the username and password the broker was
started with (default ``fedge`` / ``fedge``; ``python -m runtime.broker`` also reads the
password from ``FEDGE_BROKER_PASSWORD``). This is not decoration: amqtt throws away the
session of a disconnected *anonymous* client, so QoS 1 messages for an offline persistent
session would be lost; a named client keeps its session and its queued messages.

amqtt keeps sessions and retained messages in memory only: stopping the broker forgets them.

Run it as a process until SIGTERM or SIGINT (``runtime/broker/__main__.py``)::

    python -m runtime.broker --host 127.0.0.1 --port 1883 --username fedge
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin

from protocol.errors import ConfigError, TransportError

__all__ = [
    "DEFAULT_BROKER_HOST",
    "DEFAULT_BROKER_PASSWORD",
    "DEFAULT_BROKER_PORT",
    "DEFAULT_BROKER_USERNAME",
    "NOISY_LOGGERS",
    "PASSWORD_ENV_VAR",
    "BrokerSettings",
    "EmbeddedBroker",
    "quiet_amqtt_logging",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_BROKER_HOST = "127.0.0.1"
DEFAULT_BROKER_PORT = 1883
DEFAULT_BROKER_USERNAME = "fedge"
DEFAULT_BROKER_PASSWORD = "fedge"  # noqa: S105 - a loopback demo default, documented above
PASSWORD_ENV_VAR = "FEDGE_BROKER_PASSWORD"  # noqa: S105 - a variable name, not a secret
START_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 10.0

# amqtt logs every connection at INFO and its state machine library logs every transition.
NOISY_LOGGERS = ("amqtt", "transitions")


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    host: str
    port: int
    username: str
    password: str

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"broker port {self.port} is not in 1..65535")
        if not self.username:
            raise ConfigError("the embedded broker needs a non-empty username")


class _SharedSecretAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Admits exactly one username/password pair; named sessions are never anonymous."""

    @dataclass
    class Config:
        username: str = DEFAULT_BROKER_USERNAME
        password: str = DEFAULT_BROKER_PASSWORD

    async def authenticate(self, *, session: Any) -> bool:
        username = session.username or ""
        password = session.password or ""
        accepted = hmac.compare_digest(
            username.encode(), self.config.username.encode()
        ) & hmac.compare_digest(password.encode(), self.config.password.encode())
        if not accepted:
            logger.warning("refused client %r: wrong username or password", session.client_id)
        return accepted


_LISTENER = "default"


def _broker_config(settings: BrokerSettings) -> dict[str, Any]:
    plugin = _SharedSecretAuthPlugin
    return {
        # "external": amqtt binds nothing; _Listener owns the socket and hands connections over.
        "listeners": {_LISTENER: {"type": "external"}},
        # Only our plugin: amqtt's defaults add packet/event loggers, anonymous access and a
        # $SYS publisher that warns about a deprecated dependency.
        "plugins": {
            f"{plugin.__module__}.{plugin.__qualname__}": {
                "username": settings.username,
                "password": settings.password,
            },
        },
    }


def quiet_amqtt_logging() -> None:
    """Raise amqtt's loggers to WARNING unless the application configured them already."""
    for name in NOISY_LOGGERS:
        named = logging.getLogger(name)
        if named.level == logging.NOTSET:
            named.setLevel(logging.WARNING)


class _Listener:
    """The broker's TCP socket and every client connection on it.

    Owning the connections lets shutdown close them first, so each of amqtt's client
    handlers ends on end-of-stream. Left to amqtt, shutdown cancels the handlers instead,
    and on Python 3.11 a cancellation that races with an arriving packet is lost inside
    ``asyncio.wait_for``: shutdown then waits forever for a connected subscriber.
    """

    def __init__(self, broker: Broker, settings: BrokerSettings) -> None:
        self._broker = broker
        self._settings = settings
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def bind(self) -> None:
        """Bind the port without accepting yet; :class:`TransportError` if that fails."""
        host, port = self._settings.host, self._settings.port
        try:
            self._server = await asyncio.start_server(
                self._serve_client, host, port, reuse_address=True, start_serving=False
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TransportError(
                    f"cannot start the embedded broker: {host}:{port} is already in use "
                    "(another broker running? choose another port with --port)",
                    reason="port_in_use",
                ) from exc
            raise TransportError(
                f"cannot start the embedded broker on {host}:{port}: {exc}", reason="bind_failed"
            ) from exc

    async def start_serving(self) -> None:
        if self._server is not None:
            await self._server.start_serving()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - asyncio always runs this callback in a task
            raise RuntimeError("client connection outside a task")
        self._connections[task] = writer
        try:
            await self._broker.external_connected(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), _LISTENER
            )
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def close(self, timeout_s: float) -> None:
        """Stop accepting, reset every client connection and wait for their handlers."""
        if self._server is not None:
            self._server.close()
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=timeout_s)
            if pending:
                logger.warning(
                    "%d client connection(s) did not close within %.0f s",
                    len(pending),
                    timeout_s,
                )


async def serve(
    settings: BrokerSettings, stop: asyncio.Event, on_ready: Callable[[], None]
) -> None:
    """Run one broker until ``stop`` is set, then shut it down."""
    broker = Broker(_broker_config(settings))
    listener = _Listener(broker, settings)
    await listener.bind()
    try:
        await broker.start()
    except BrokerError as exc:
        await listener.close(SHUTDOWN_TIMEOUT_S)
        raise TransportError(
            f"cannot start the embedded broker: {exc}", reason="broker_start_failed"
        ) from exc
    try:
        await listener.start_serving()
        logger.info("embedded broker listening on %s:%d", settings.host, settings.port)
        on_ready()
        await stop.wait()
    finally:
        await listener.close(SHUTDOWN_TIMEOUT_S)
        await broker.shutdown()
        logger.info("embedded broker on %s:%d stopped", settings.host, settings.port)


class EmbeddedBroker:
    """The embedded broker in a background thread of this process.

    ``start()`` returns once the port accepts connections (or raises
    :class:`TransportError`); ``stop()`` shuts the broker down and joins the thread.
    Usable as a context manager.
    """

    def __init__(
        self,
        host: str = DEFAULT_BROKER_HOST,
        port: int = DEFAULT_BROKER_PORT,
        *,
        username: str = DEFAULT_BROKER_USERNAME,
        password: str = DEFAULT_BROKER_PASSWORD,
    ) -> None:
        self._settings = BrokerSettings(host, port, username, password)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def host(self) -> str:
        return self._settings.host

    @property
    def port(self) -> int:
        return self._settings.port

    @property
    def username(self) -> str:
        return self._settings.username

    @property
    def password(self) -> str:
        return self._settings.password

    @property
    def url(self) -> str:
        return f"mqtt://{self._settings.host}:{self._settings.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self._thread is not None:
            raise ConfigError("the embedded broker is already running")
        quiet_amqtt_logging()
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._run, name="fedge-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise TransportError(
                f"the embedded broker did not start within {timeout_s:.0f} s",
                reason="broker_start_timeout",
            )
        if self._failure is not None:
            self._thread.join()
            self._thread = None
            failure = self._failure
            if isinstance(failure, TransportError | ConfigError):
                raise failure
            raise TransportError(f"the embedded broker failed to start: {failure}") from failure

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            # The loop may have finished already (startup failure); then nothing is left to stop.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        if thread.is_alive():
            raise TransportError(
                f"the embedded broker did not stop within {timeout_s:.0f} s",
                reason="broker_stop_timeout",
            )
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # start() re-raises it in the caller's thread
            if self._ready.is_set():
                logger.exception("embedded broker on %s failed", self.url)
            self._failure = exc
        finally:
            self._loop = None
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await serve(self._settings, self._stop, self._ready.set)
