"""The agent's labelled sample store: cleaned, deduplicated, bounded per class, on disk.

Layout under ``root``::

    index.sqlite                 one row per sample held, and per label the count offered
    images/<label>/<id>.<ext>    the encoded bytes exactly as received

The index is the truth. A file is written before its row is committed and deleted after
its row is gone, so a crash leaves at most a stray file; the next open removes stray
files, and drops (with a warning) rows whose file has vanished.

Ingest turns images away with a reason rather than an error:

- what :func:`~agent.preprocess.decode_image` refuses (``undecodable``, ``empty``,
  ``too_large``, ``unsupported``), and decodable formats without a known signature
  (``unsupported_format``);
- what :func:`~agent.cleaning.check_frame` refuses (``blank``, ``saturated``, ``too_dark``);
- ``duplicate``: the same bytes, or a perceptual hash within ``policy.duplicate_distance``
  bits, as a sample held under the same label;
- ``reservoir``: the label is full and this sample lost the draw.

Each label holds at most ``max_per_class`` samples, a uniform random sample of all the
clean, distinct ones it was ever offered (reservoir sampling, Algorithm R). Every draw is
derived from ``seed``, the label and the label's offered count, so what is held depends
only on the seed and the order of adds, across restarts too. Lowering ``max_per_class``
on an existing store evicts nothing by itself: a label above the new bound changes only
by replacement from then on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.cleaning import CleaningPolicy, check_frame, hamming, perceptual_hash
from agent.preprocess import decode_image
from protocol.errors import ConfigError, PreprocessError, StoreError

__all__ = [
    "DEFAULT_MAX_PER_CLASS",
    "IMPORT_EXTENSIONS",
    "STORE_DUPLICATE_DISTANCE_BITS",
    "AddResult",
    "ImportReport",
    "SampleStore",
    "StoredSample",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PER_CLASS = 500
# Stored samples are often tiny (digits): 4 bits would call ~5% of distinct digits
# duplicates, 2 bits well under 1% (see CleaningPolicy).
STORE_DUPLICATE_DISTANCE_BITS = 2
IMPORT_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

_INDEX_NAME = "index.sqlite"
_IMAGES_DIR = "images"
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


class SampleStore:
    """Labelled samples on disk with a SQLite index; safe to use from several threads.

    ``policy`` supplies the frame checks and ``duplicate_distance`` (default
    :data:`STORE_DUPLICATE_DISTANCE_BITS`); its ``duplicate_window_s`` is not used, since
    a sample is a duplicate for as long as the one it matches is held. Several stores
    (processes) may share one ``root``: each add is one SQLite write transaction.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_per_class: int = DEFAULT_MAX_PER_CLASS,
        policy: CleaningPolicy | None = None,
        seed: int = 0,
    ) -> None:
        if max_per_class < 1:
            raise ConfigError(f"max_per_class must be at least 1, got {max_per_class}")
        self.root = root
        self.max_per_class = max_per_class
        self.policy = policy or CleaningPolicy(
            duplicate_distance=STORE_DUPLICATE_DISTANCE_BITS, duplicate_window_s=math.inf
        )
        self._seed = seed
        self._images = root / _IMAGES_DIR
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._images.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the sample store at {root}: {exc}", reason="io"
            ) from exc
        self._db = _open_index(root / _INDEX_NAME)
        try:
            self._reconcile()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def add(self, image: bytes, *, label: str, source: str = "import") -> AddResult:
        """Clean ``image`` and store it under ``label`` unless it is rejected.

        Raises :class:`StoreError` for a label that is not 1-64 of ``A-Za-z0-9_.-`` (reason
        ``bad_label``) and when the disk or index fails; an image that is not worth keeping
        is not an error: ``stored`` is False and ``reason`` says why.
        """
        _check_label(label)
        # Decoding and hashing need no lock: only the index decisions are serialised.
        candidate = _inspect(image, self.policy)
        if isinstance(candidate, str):
            logger.debug("sample for %r rejected: %s", label, candidate)
            return AddResult(stored=False, reason=candidate, sample_id=None, evicted=None)
        with self._lock:
            self._check_open()
            return self._admit(image, candidate, label, source)

    def counts(self) -> dict[str, int]:
        """Samples held per label."""
        with self._lock, self._index("count the samples"):
            self._check_open()
            rows = self._db.execute(
                "SELECT label, COUNT(*) FROM samples GROUP BY label ORDER BY label"
            ).fetchall()
        return {str(label): int(count) for label, count in rows}

    def samples(self, label: str | None = None) -> list[StoredSample]:
        """The samples held (under ``label``, or all), oldest first."""
        query = "SELECT sample_id, label, ext, source, added_at FROM samples"
        params: tuple[str, ...] = ()
        if label is not None:
            query += " WHERE label = ?"
            params = (label,)
        with self._lock, self._index("list the samples"):
            self._check_open()
            rows = self._db.execute(query + " ORDER BY seq", params).fetchall()
        return [
            StoredSample(
                sample_id=sample_id,
                label=row_label,
                path=self._path(row_label, sample_id, ext),
                source=source,
                added_at=float(added_at),
            )
            for sample_id, row_label, ext, source, added_at in rows
        ]

    def load_image(self, sample: StoredSample) -> bytes:
        """The encoded bytes of a sample, exactly as they were added."""
        try:
            return sample.path.read_bytes()
        except OSError as exc:
            raise StoreError(
                f"cannot read sample {sample.sample_id}: {exc}", reason="missing"
            ) from exc

    def import_folder(self, folder: Path) -> ImportReport:
        """Add every image of ``folder/<label>/``, in sorted order; the label is the folder name.

        Image files are those with an extension in :data:`IMPORT_EXTENSIONS` (any case).
        A folder whose name is not a valid label has its images rejected as ``bad_label``.
        """
        if not folder.is_dir():
            raise StoreError(f"{folder} is not a folder", reason="not_a_folder")
        added = skipped = evicted = 0
        rejected: Counter[str] = Counter()
        for entry in _sorted_entries(folder):
            if not entry.is_dir() or entry.name.startswith("."):
                skipped += 1
                continue
            for path in _sorted_entries(entry):
                if not path.is_file() or path.suffix.lower() not in IMPORT_EXTENSIONS:
                    skipped += 1
                    continue
                result = self._import_file(path, entry.name)
                if result.stored:
                    added += 1
                    evicted += result.evicted is not None
                else:
                    rejected[result.reason or "rejected"] += 1
        report = ImportReport(
            added=added, rejected=dict(rejected), skipped=skipped, evicted=evicted
        )
        logger.info(
            "imported %s: %d added (%d evicted), %d rejected %s, %d skipped",
            folder,
            added,
            evicted,
            sum(rejected.values()),
            dict(rejected),
            skipped,
        )
        return report

    # -- internals ------------------------------------------------------------------------

    def _import_file(self, path: Path, label: str) -> AddResult:
        if not _is_label(label):
            return _not_stored("bad_label")
        try:
            data = path.read_bytes()
        except OSError as exc:
            logger.warning("cannot read %s: %s", path, exc)
            return _not_stored("unreadable")
        result = self.add(data, label=label, source="import")
        if not result.stored:
            logger.debug("not imported %s: %s", path, result.reason)
        return result

    def _admit(self, image: bytes, candidate: _Candidate, label: str, source: str) -> AddResult:
        # One write transaction from the duplicate check to the insert, file write included:
        # another process on the same root (an import beside the daemon) then sees either
        # no trace of this add or all of it, and never takes its file for a stray.
        written: Path | None = None
        try:
            with self._transaction("add a sample"):
                if self._is_duplicate(label, candidate):
                    return _not_stored("duplicate")
                offered = self._offered(label) + 1
                self._set_offered(label, offered)
                keep, evict = self._reservoir(label, offered)
                if not keep:
                    return _not_stored("reservoir")
                sample_id = _sample_id(label, candidate.sha256)
                written = self._path(label, sample_id, candidate.ext)
                _write_file(written, image)
                evicted_path = self._delete_row(evict) if evict is not None else None
                self._insert_row(sample_id, label, candidate, source)
        except BaseException:
            if written is not None:
                _remove_file(written)
            raise
        if evicted_path is not None:
            _remove_file(evicted_path)
        return AddResult(stored=True, reason=None, sample_id=sample_id, evicted=evict)

    def _reservoir(self, label: str, offered: int) -> tuple[bool, str | None]:
        """Algorithm R: whether the ``offered``-th sample of a label is kept, and in whose place."""
        held = [
            row[0]
            for row in self._db.execute(
                "SELECT sample_id FROM samples WHERE label = ? ORDER BY seq", (label,)
            )
        ]
        if len(held) < self.max_per_class:
            return True, None
        slot = _reservoir_draw(self._seed, label, offered)
        if slot >= self.max_per_class:
            return False, None
        return True, str(held[slot])

    def _insert_row(self, sample_id: str, label: str, candidate: _Candidate, source: str) -> None:
        self._db.execute(
            "INSERT INTO samples (sample_id, label, ext, source, added_at, sha256, phash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                sample_id,
                label,
                candidate.ext,
                source,
                time.time(),
                candidate.sha256,
                f"{candidate.phash:016x}",
            ),
        )

    def _is_duplicate(self, label: str, candidate: _Candidate) -> bool:
        same = self._db.execute(
            "SELECT 1 FROM samples WHERE label = ? AND sha256 = ?", (label, candidate.sha256)
        ).fetchone()
        if same is not None:
            return True
        limit = self.policy.duplicate_distance
        rows = self._db.execute("SELECT phash FROM samples WHERE label = ?", (label,))
        return any(hamming(candidate.phash, int(row[0], 16)) <= limit for row in rows)

    def _offered(self, label: str) -> int:
        row = self._db.execute("SELECT offered FROM labels WHERE label = ?", (label,)).fetchone()
        return int(row[0]) if row else 0

    def _set_offered(self, label: str, offered: int) -> None:
        self._db.execute(
            "INSERT INTO labels (label, offered) VALUES (?, ?) "
            "ON CONFLICT(label) DO UPDATE SET offered = excluded.offered",
            (label, offered),
        )

    def _delete_row(self, sample_id: str) -> Path | None:
        """Remove a sample's row; its file is for the caller to delete after the commit."""
        row = self._db.execute(
            "DELETE FROM samples WHERE sample_id = ? RETURNING label, ext", (sample_id,)
        ).fetchone()
        return self._path(row[0], sample_id, row[1]) if row else None

    def _reconcile(self) -> None:
        """Make the files match the index after a crash: drop dangling rows, stray files."""
        # Under the write lock, so no other process is between writing a file and its row.
        with self._transaction("reconcile the index with the files"):
            rows = self._db.execute("SELECT sample_id, label, ext FROM samples").fetchall()
            paths = {sid: self._path(label, sid, ext) for sid, label, ext in rows}
            missing = [sid for sid, path in paths.items() if not path.is_file()]
            if missing:
                logger.warning(
                    "%d samples in the index have no file; dropping them: %s",
                    len(missing),
                    ", ".join(str(paths[sid]) for sid in missing[:5]),
                )
                self._db.executemany(
                    "DELETE FROM samples WHERE sample_id = ?", [(sid,) for sid in missing]
                )
            expected = set(paths.values())
            stray = [path for path in self._image_files() if path not in expected]
            if stray:
                logger.info("removing %d files left over from an interrupted add", len(stray))
            for path in stray:
                _remove_file(path)

    def _image_files(self) -> list[Path]:
        try:
            return [
                path
                for label_dir in self._images.iterdir()
                if label_dir.is_dir()
                for path in label_dir.iterdir()
                if path.is_file()
            ]
        except OSError as exc:
            raise StoreError(f"cannot list {self._images}: {exc}", reason="io") from exc

    def _path(self, label: str, sample_id: str, ext: str) -> Path:
        return self._images / label / f"{sample_id}.{ext}"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the sample store is closed", reason="closed")

    @contextmanager
    def _index(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"cannot {action} in {self.root}: {exc}", reason="index") from exc

    @contextmanager
    def _transaction(self, action: str) -> Iterator[None]:
        with self._index(action):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


# -- pure helpers -------------------------------------------------------------------------


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
