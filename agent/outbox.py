"""The on-disk outbox: every message that must not be lost waits here until the broker acked it.

A row is written (and committed) before the message is handed to the MQTT link, and
deleted when the broker's PUBACK arrives. After a restart every row still there is sent
again, so delivery is at least once: a message whose ack was lost in a crash arrives twice,
and consumers deduplicate by its id (``frame_id`` for results, ``command_id`` for acks).

The outbox is bounded: past ``max_rows`` the oldest droppable rows (inference results) go
first and are counted; rows that are not droppable (update chunks, events) are never
dropped to make room.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import StoreError

__all__ = ["Outbox", "OutboxItem"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    droppable INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    row_id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """A SQLite-backed queue of outgoing messages, safe to use from several threads."""

    def __init__(self, path: Path, *, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.path = path
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            # Kept in memory: a COUNT(*) per message scans the table, O(backlog) per frame
            # exactly when the backlog is large.
            (rows,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            self._rows = int(rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the outbox at {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()

    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        droppable: bool = False,
    ) -> OutboxItem:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, droppable) VALUES (?,?,?,?,?)",
                (topic, payload, qos, int(retain), int(droppable)),
            )
            row_id = cursor.lastrowid
            self._rows += 1
            self._enforce_bound()
        assert row_id is not None
        return OutboxItem(row_id, topic, payload, qos, retain)

    def ack(self, row_id: int) -> None:
        with self._lock:
            if self._closed:
                # An ack racing a shutdown: the row stays and is sent again next start.
                logger.debug("ack for row %d after close; it will be resent", row_id)
                return
            self._rows -= self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,)).rowcount

    def pending(self) -> list[OutboxItem]:
        """Every row not yet acknowledged, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id"
            ).fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._rows

    @property
    def dropped(self) -> int:
        """Droppable rows removed to keep the outbox within ``max_rows``, over its lifetime."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def _enforce_bound(self) -> None:
        count = self._rows
        excess = count - self.max_rows
        if excess <= 0:
            return
        removed = self._db.execute(
            "DELETE FROM outbox WHERE id IN "
            "(SELECT id FROM outbox WHERE droppable = 1 ORDER BY id LIMIT ?)",
            (excess,),
        ).rowcount
        self._rows -= removed
        if removed:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('dropped', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (removed,),
            )
            logger.warning("outbox full (%d rows): dropped the %d oldest results", count, removed)
