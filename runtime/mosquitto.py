"""Mosquitto as a subprocess: where its binary is, the config the suite and benchmarks use."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

from runtime.launcher import (
    LOOPBACK,
    WAIT_TIMEOUT_S,
    BrokerProcess,
    BrokerStartError,
    read_text,
    wait_until,
)

__all__ = ["MosquittoProcess", "find_mosquitto", "mosquitto_config"]

MOSQUITTO_MAX_PACKET_BYTES = 64 * 1024 * 1024
MOSQUITTO_MAX_QUEUED_MESSAGES = 100_000
MOSQUITTO_AUTOSAVE_INTERVAL_S = 1


def find_mosquitto() -> Path | None:
    """The mosquitto binary, if installed (it lives in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    candidate = Path("/usr/sbin/mosquitto")
    return candidate if candidate.is_file() else None


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
        return read_text(self.output_path) + read_text(self.log_path)

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
