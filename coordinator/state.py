"""The coordinator's durable state in SQLite: plans, rounds, updates, releases, blobs.

Everything a restarted coordinator needs to resume the round it was in lives here. An
update is keyed by (round, agent), so a duplicate is stored once and never aggregated
twice; a round's state moves announced -> done | failed exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import StoreError

__all__ = ["CoordinatorState", "RoundRecord", "StoredUpdate"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    version TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    release_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    base_version TEXT NOT NULL,
    selected TEXT NOT NULL,
    config TEXT NOT NULL,
    deadline_at REAL NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    reason TEXT,
    metrics TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    agent TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    encoding TEXT NOT NULL,
    payload BLOB NOT NULL,
    loss REAL,
    accuracy REAL,
    received_at REAL NOT NULL,
    PRIMARY KEY (round, agent)
);
"""


@dataclass(frozen=True, slots=True)
class RoundRecord:
    round: int
    state: str
    base_version: str
    selected: tuple[str, ...]
    config: dict[str, Any]
    deadline_at: float
    started_at: float
    finished_at: float | None
    reason: str | None
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoredUpdate:
    round: int
    agent: str
    num_examples: int
    encoding: str
    payload: bytes
    loss: float | None
    accuracy: float | None


class CoordinatorState:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # No fsync per commit (each update is one): in WAL mode a crash of the process
            # loses nothing, a power cut at most the last commits, and agents send a kept
            # update again when its round is announced again.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open coordinator state {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # key-value
    def get(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    # blobs
    def put_blob(self, sha256: str, data: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO blobs (sha256, data) VALUES (?, ?)", (sha256, data)
            )

    def blob(self, sha256: str) -> bytes:
        with self._lock:
            row = self._db.execute("SELECT data FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            raise StoreError(f"blob {sha256[:12]} is not stored", reason="missing")
        return bytes(row[0])

    # releases
    def put_release(self, version: str, round_number: int, release_json: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO releases (version, round, release_json, created_at) "
                "VALUES (?, ?, ?, ?)",
                (version, round_number, release_json, time.time()),
            )

    def release_json(self, version: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT release_json FROM releases WHERE version = ?", (version,)
            ).fetchone()
        return str(row[0]) if row else None

    # rounds
    def start_round(
        self,
        round_number: int,
        *,
        base_version: str,
        selected: tuple[str, ...],
        config: dict[str, Any],
        deadline_at: float,
        started_at: float,
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO rounds (round, state, base_version, selected, config, deadline_at,"
                " started_at) VALUES (?, 'announced', ?, ?, ?, ?, ?)",
                (
                    round_number,
                    base_version,
                    json.dumps(list(selected)),
                    json.dumps(config),
                    deadline_at,
                    started_at,
                ),
            )

    def extend_round(self, round_number: int, deadline_at: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE rounds SET deadline_at = ? WHERE round = ?", (deadline_at, round_number)
            )

    def finish_round(
        self, round_number: int, *, state: str, reason: str | None, metrics: dict[str, Any]
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE rounds SET state = ?, reason = ?, metrics = ?, finished_at = ? "
                "WHERE round = ? AND state = 'announced'",
                (state, reason, json.dumps(metrics), time.time(), round_number),
            )

    def round(self, round_number: int) -> RoundRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT round, state, base_version, selected, config, deadline_at, started_at,"
                " finished_at, reason, metrics FROM rounds WHERE round = ?",
                (round_number,),
            ).fetchone()
        return _round_record(row) if row else None

    def rounds(self, after: int = 0) -> list[RoundRecord]:
        """Every round numbered above ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT round, state, base_version, selected, config, deadline_at, started_at,"
                " finished_at, reason, metrics FROM rounds WHERE round > ? ORDER BY round",
                (after,),
            ).fetchall()
        return [_round_record(row) for row in rows]

    def last_round_number(self) -> int:
        with self._lock:
            (number,) = self._db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()
        return int(number)

    # updates
    def add_update(self, update: StoredUpdate) -> bool:
        """Store an update; False if this agent's update for this round is already in."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO updates (round, agent, num_examples, encoding, payload,"
                " loss, accuracy, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    update.round,
                    update.agent,
                    update.num_examples,
                    update.encoding,
                    update.payload,
                    update.loss,
                    update.accuracy,
                    time.time(),
                ),
            )
        return cursor.rowcount == 1

    def update_agents(self, round_number: int) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT agent FROM updates WHERE round = ?", (round_number,)
            ).fetchall()
        return {str(row[0]) for row in rows}

    def update(self, round_number: int, agent: str) -> StoredUpdate | None:
        """One update; aggregation reads them one by one so memory stays O(model)."""
        with self._lock:
            r = self._db.execute(
                "SELECT round, agent, num_examples, encoding, payload, loss, accuracy "
                "FROM updates WHERE round = ? AND agent = ?",
                (round_number, agent),
            ).fetchone()
        return StoredUpdate(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6]) if r else None

    def updates(self, round_number: int) -> list[StoredUpdate]:
        with self._lock:
            rows = self._db.execute(
                "SELECT round, agent, num_examples, encoding, payload, loss, accuracy "
                "FROM updates WHERE round = ? ORDER BY agent",
                (round_number,),
            ).fetchall()
        return [StoredUpdate(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6]) for r in rows]


def _round_record(row: tuple[Any, ...]) -> RoundRecord:
    return RoundRecord(
        round=row[0],
        state=row[1],
        base_version=row[2],
        selected=tuple(json.loads(row[3])),
        config=json.loads(row[4]),
        deadline_at=row[5],
        started_at=row[6],
        finished_at=row[7],
        reason=row[8],
        metrics=json.loads(row[9]) if row[9] else {},
    )
