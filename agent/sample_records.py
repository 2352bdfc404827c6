"""The sample store's stateless parts: records, checks on what comes in, index and files.

The SQLite index (one row per sample) and the files behind it are written here; the
store (``agent.store``) decides what is admitted, evicted and reconciled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.cleaning import CleaningPolicy, check_frame, perceptual_hash
from agent.preprocess import decode_image
from protocol.errors import PreprocessError, StoreError

logger = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
_SAMPLE_ID_HEX_CHARS = 24
_TMP_SUFFIX = ".tmp"
_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Valid by the pattern, but they name directories that are not a label's own.
_RESERVED_LABELS = frozenset({".", ".."})
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    ext TEXT NOT NULL,
    source TEXT NOT NULL,
    added_at REAL NOT NULL,
    sha256 TEXT NOT NULL,
    phash TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS samples_by_content ON samples (label, sha256);
CREATE TABLE IF NOT EXISTS labels (label TEXT PRIMARY KEY, offered INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class AddResult:
    """What became of an offered sample; ``reason`` says why it was not stored."""

    stored: bool
    reason: str | None
    sample_id: str | None
    evicted: str | None


@dataclass(frozen=True, slots=True)
class StoredSample:
    """A sample held by the store; ``added_at`` is in Unix seconds."""

    sample_id: str
    label: str
    path: Path
    source: str
    added_at: float


@dataclass(frozen=True, slots=True)
class ImportReport:
    """Counts of one folder import.

    ``rejected`` counts by reason the images not stored (``reservoir`` included);
    ``skipped`` counts the entries not read as images: files with another extension,
    files outside a label folder, nested and hidden folders.
    """

    added: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    skipped: int = 0
    evicted: int = 0


@dataclass(frozen=True, slots=True)
class _Candidate:
    sha256: str
    phash: int
    ext: str


def _not_stored(reason: str) -> AddResult:
    return AddResult(stored=False, reason=reason, sample_id=None, evicted=None)


def _is_label(label: str) -> bool:
    return _LABEL.fullmatch(label) is not None and label not in _RESERVED_LABELS


def _check_label(label: str) -> None:
    if not _is_label(label):
        raise StoreError(
            f"label {label!r} is not 1-64 characters of A-Za-z0-9_.- (nor '.' or '..')",
            reason="bad_label",
        )


def _inspect(image: bytes, policy: CleaningPolicy) -> _Candidate | str:
    """The hashes and file extension of an image worth keeping, or why it is not."""
    try:
        bgr = decode_image(image)
    except PreprocessError as exc:
        return exc.reason
    ext = _extension(image)
    if ext is None:
        return "unsupported_format"
    verdict = check_frame(bgr, policy)
    if verdict is not None:
        return verdict.value
    return _Candidate(sha256=hashlib.sha256(image).hexdigest(), phash=perceptual_hash(bgr), ext=ext)


def _extension(data: bytes) -> str | None:
    """The file extension matching the signature of encoded image bytes."""
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    for signature, ext in _SIGNATURES:
        if data.startswith(signature):
            return ext
    return None


def _reservoir_draw(seed: int, label: str, offered: int) -> int:
    """Algorithm R's draw for a label's ``offered``-th sample: uniform in [0, offered).

    A fresh generator per draw, seeded from a string (which Python hashes with SHA-512,
    independent of ``PYTHONHASHSEED``), so no generator state has to be kept on disk.
    """
    rng = random.Random(f"fedge-reservoir:{seed}:{label}:{offered}")  # noqa: S311 (not crypto)
    return rng.randrange(offered)


def _sample_id(label: str, sha256: str) -> str:
    return hashlib.sha256(f"{label}\0{sha256}".encode()).hexdigest()[:_SAMPLE_ID_HEX_CHARS]


def _sorted_entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise StoreError(f"cannot list {folder}: {exc}", reason="io") from exc


# -- I/O edges ----------------------------------------------------------------------------


def _open_index(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the sample index {path}: {exc}", reason="index") from exc
    try:
        _prepare_index(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _prepare_index(db: sqlite3.Connection, path: Path) -> None:
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        (version,) = db.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the sample index {path}: {exc}", reason="index") from exc
    if version > _SCHEMA_VERSION:
        raise StoreError(
            f"sample index {path} has schema {version}; this fedge knows {_SCHEMA_VERSION}",
            reason="index",
        )
    try:
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot create the sample index {path}: {exc}", reason="index") from exc


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` durably: to a temporary name, flushed to disk, then renamed."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc}", reason="io") from exc


def _remove_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        # Without a row the file is a stray, which the next open removes.
        logger.warning("cannot remove %s: %s", path, exc)
