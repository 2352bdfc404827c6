"""Bandwidth below TCP: a network namespace whose loopback is shaped by ``tc ... tbf`` (root).

:class:`ShapedNamespace` makes a namespace of its own (``fedge-<hex>``), brings its loopback
up and puts a token bucket (``tbf``) on it; nothing on the host's own interfaces changes.
Programs run inside with :meth:`ShapedNamespace.command`. They reach a broker on the host
through :meth:`ShapedNamespace.forward`: a relay inside the namespace listens on the
namespace's loopback (the shaped hop) and hands each connection to a Unix socket, which the
host side (a thread here) connects to the broker. Unix sockets cross network namespaces
because they live in the file system.

The token bucket shapes every packet leaving the namespace's loopback, so the rate is the
two directions together. Latency and loss need ``netem``, which these machines lack: use
``fedge.harness.links``'s user-space proxy for those.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import TracebackType

__all__ = ["ShapedNamespace", "namespaces_available"]

TC_TIMEOUT_S = 30.0
RELAY_START_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"
_BURST_BYTES = 16 * 1024
_LATENCY_MS = 500
_MTU_BYTES = 1500


def namespaces_available() -> bool:
    """True as root with ``ip`` and ``tc`` installed (the only place this works)."""
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("ip", "tc"))


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=TC_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


class ShapedNamespace:
    """A namespace whose loopback carries at most ``rate_bps`` bits per second."""

    def __init__(self, rate_bps: int, workdir: Path) -> None:
        self.name = f"fedge-{uuid.uuid4().hex[:8]}"
        self.rate_bps = rate_bps
        self.workdir = workdir
        self._relays: list[subprocess.Popen[bytes]] = []
        self._listeners: list[socket.socket] = []
        self._closed = threading.Event()
        workdir.mkdir(parents=True, exist_ok=True)
        _run("ip", "netns", "add", self.name)
        try:
            # A packet larger than the bucket can never leave it: loopback's 64 KiB MTU
            # would stall every large segment, so use Ethernet's.
            _run("ip", "-n", self.name, "link", "set", "lo", "mtu", str(_MTU_BYTES), "up")
            _run(
                "tc", "-n", self.name, "qdisc", "add", "dev", "lo", "root", "tbf",
                "rate", f"{rate_bps}bit", "burst", str(_BURST_BYTES),
                "latency", f"{_LATENCY_MS}ms",
            )  # fmt: skip
        except RuntimeError:
            _run("ip", "netns", "delete", self.name)
            raise

    def __enter__(self) -> ShapedNamespace:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def sent_bytes(self) -> int:
        """Bytes the token bucket let through so far (``tc -s qdisc``)."""
        text = _run("tc", "-n", self.name, "-s", "qdisc", "show", "dev", "lo")
        words = text.split()
        return int(words[words.index("Sent") + 1])

    def forward(self, port: int, broker: tuple[str, int]) -> None:
        """Make ``127.0.0.1:port`` inside the namespace reach ``broker`` on the host."""
        path = self.workdir / f"relay-{port}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        self._listeners.append(listener)
        threading.Thread(target=self._serve, args=(listener, broker), daemon=True).start()
        ready = self.workdir / f"relay-{port}.ready"
        # The relay imports this module: hand it the same import path as this process.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        relay = subprocess.Popen(
            self.command([sys.executable, "-m", __name__, str(port), str(path), str(ready)]),
            env=env,
        )
        self._relays.append(relay)
        deadline = threading.Event()
        for _ in range(int(RELAY_START_TIMEOUT_S * 20)):
            if ready.exists() or relay.poll() is not None:
                break
            deadline.wait(0.05)  # the relay process writes the file once it listens
        if not ready.exists():
            raise RuntimeError(f"relay in {self.name} did not start (status {relay.poll()})")

    def _serve(self, listener: socket.socket, broker: tuple[str, int]) -> None:
        while not self._closed.is_set():
            try:
                inner, _ = listener.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(broker)
            except OSError:
                inner.close()
                continue
            outer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _splice(inner, outer)

    def close(self) -> None:
        self._closed.set()
        for relay in self._relays:
            relay.terminate()
            relay.wait(TC_TIMEOUT_S)
        for listener in self._listeners:
            listener.close()
        _run("ip", "netns", "delete", self.name)


def _splice(a: socket.socket, b: socket.socket) -> None:
    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # either end gone: the connection is over
        for sock in (source, sink):
            with contextlib.suppress(OSError):  # already shut by the other direction
                sock.shutdown(socket.SHUT_RDWR)

    for source, sink in ((a, b), (b, a)):
        threading.Thread(target=pump, args=(source, sink), daemon=True).start()


def _relay(port: int, unix_path: str, ready: Path) -> None:
    """Inside the namespace: TCP on its (shaped) loopback -> the host's Unix socket."""
    listener = socket.create_server((LOOPBACK, port))
    ready.write_text("ok")
    while True:
        client, _ = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(unix_path)
        _splice(client, upstream)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="relay inside a shaped namespace")
    parser.add_argument("port", type=int)
    parser.add_argument("unix_path")
    parser.add_argument("ready", type=Path)
    arguments = parser.parse_args()
    _relay(arguments.port, arguments.unix_path, arguments.ready)
