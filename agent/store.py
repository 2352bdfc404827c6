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

import logging
import math
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.cleaning import CleaningPolicy, hamming
from agent.sample_records import (
    AddResult,
    ImportReport,
    StoredSample,
    _Candidate,
    _check_label,
    _inspect,
    _is_label,
    _not_stored,
    _open_index,
    _remove_file,
    _reservoir_draw,
    _sample_id,
    _sorted_entries,
    _write_file,
)
from protocol.errors import ConfigError, StoreError

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
