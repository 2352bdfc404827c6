"""Network faults for tests and benchmarks: a TCP proxy between client and broker that misbehaves.

:class:`TcpProxy` listens on a free loopback port and forwards every connection to the
broker, with two threads per connection (one per direction). ``hold_upstream()`` makes it
swallow what clients send from then on (the bytes are counted and never delivered), while
the broker's traffic still reaches the clients: the broker never sees a PUBLISH, so it
never acknowledges it. ``hold_downstream()`` is the mirror: the client stops hearing the
broker while the broker still believes it connected (a link that died one way). With a
:class:`fedge.harness.links.LinkProfile` every connection goes through a slow or lossy
link instead (latency, jitter, bandwidth, stalls, loss bursts). ``bytes_up`` and
``bytes_down`` count what was delivered each way. ``cut()`` breaks the link: every
connection ends and new ones are accepted and closed at once, until ``restore()``.
``close()`` ends every connection and thread; the proxy is a context manager so a test
cannot leave it running.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType

from fedge.harness.links import CLEAN, CountBytes, LinkProfile, Schedule, ShapedPipe

__all__ = ["TcpProxy"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ACCEPT_POLL_S = 0.1
JOIN_TIMEOUT_S = 5.0
RECV_BYTES = 64 * 1024


class TcpProxy:
    """Forward ``host:port`` (a free loopback port) to ``upstream_host:upstream_port``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = LOOPBACK,
        profile: LinkProfile = CLEAN,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.profile = profile
        self._started = time.monotonic()
        self._up = CountBytes()
        self._down = CountBytes()
        self._pipes: list[ShapedPipe] = []
        self._schedule = Schedule(profile, self._started)
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(ACCEPT_POLL_S)
        self.host: str = host
        self.port: int = self._listener.getsockname()[1]
        self._held = threading.Event()
        self._held_down = threading.Event()
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.held_bytes = 0
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def bytes_up(self) -> int:
        """Bytes delivered client -> broker so far."""
        return self._up.value

    @property
    def bytes_down(self) -> int:
        """Bytes delivered broker -> client so far."""
        return self._down.value

    def open_at(self, moment: float) -> float:
        """When a byte ready at ``moment`` (monotonic) may cross the link (stalls, bursts)."""
        return self._schedule.open_at(moment)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def hold_upstream(self) -> None:
        """From now on, keep every client->broker byte; broker->client bytes still flow."""
        self._held.set()

    def hold_downstream(self) -> None:
        """From now on, keep every broker->client byte; client->broker bytes still flow."""
        self._held_down.set()

    def cut(self) -> None:
        """Break the link: end every connection, refuse new ones until :meth:`restore`."""
        self._cut.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def restore(self) -> None:
        """Mend the link: new connections go through again, nothing is held any more."""
        self._held.clear()
        self._held_down.clear()
        self._cut.clear()

    def close(self) -> None:
        """Close the listener and every connection; wait for the threads to end."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._acceptor.join(JOIN_TIMEOUT_S)
        self._listener.close()
        with self._lock:
            sockets, threads, pipes = list(self._sockets), list(self._threads), list(self._pipes)
        for pipe in pipes:
            pipe.stop()
            threads += pipe.threads
        for sock in sockets:
            _shut(sock)
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        for sock in sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._closed.is_set():
                    logger.warning("proxy listener failed", exc_info=True)
                return
            if self._cut.is_set():
                _shut(client)
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError as exc:
                logger.warning("proxy cannot reach %s:%d: %s", *self.upstream, exc)
                _shut(client)
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed.is_set():
                    _shut(client)
                    _shut(upstream)
                    client.close()
                    upstream.close()
                    return
                self.connections += 1
                self._sockets += [client, upstream]
                if self.profile.shaped:
                    self._shape(client, upstream)
                    continue
                for source, sink, is_upstream in (
                    (client, upstream, True),
                    (upstream, client, False),
                ):
                    thread = threading.Thread(
                        target=self._pump,
                        args=(source, sink, is_upstream),
                        name=f"proxy-{'up' if is_upstream else 'down'}",
                        daemon=True,
                    )
                    thread.start()
                    self._threads.append(thread)

    def _shape(self, client: socket.socket, upstream: socket.socket) -> None:
        def end() -> None:
            _shut(client)
            _shut(upstream)

        # One schedule for the whole proxy: a stall hits every connection at once.
        for source, sink, count, name in (
            (client, upstream, self._up, "link-up"),
            (upstream, client, self._down, "link-down"),
        ):
            self._pipes.append(
                ShapedPipe(
                    source,
                    sink,
                    self.profile,
                    start=self._started,
                    count=count,
                    on_end=end,
                    name=name,
                )
            )

    def _pump(self, source: socket.socket, sink: socket.socket, is_upstream: bool) -> None:
        try:
            while True:
                data = source.recv(RECV_BYTES)
                if not data:
                    break
                if (self._held if is_upstream else self._held_down).is_set():
                    with self._lock:
                        self.held_bytes += len(data)
                    continue
                sink.sendall(data)
                (self._up if is_upstream else self._down)(len(data))
        except OSError as exc:
            # A reset or a close() from the other direction ends the connection either way.
            logger.debug("proxy connection ended: %s", exc)
        # One side gone: end both, as a broken network path would.
        _shut(source)
        _shut(sink)


def _shut(sock: socket.socket) -> None:
    """Wake any thread blocked on ``sock`` and end the connection (the owner closes it)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        logger.debug("socket already shut down")
