"""Putting the coordinator's retained messages back when the broker has lost them.

fedge keeps the fleet's shared state in retained messages: the current release's manifest
and blob chunks, the round announcement, the coordinator's status. A broker restarted
without persistence, restarted from a database older than its last changes (Mosquitto
saves every ``autosave_interval``), or a recreated container, has forgotten some or all of
them, and agents then wait for chunks that never come. So after every reconnect:

- session present false: the broker has forgotten us, so it has forgotten our retained
  messages too; republish everything at once;
- session present true: the broker's database may still be older than our last
  release; re-subscribing brings the retained manifest of the current release back, and
  if it has not come within ``RETAINED_CHECK_S``, republish everything.

A manifest that came back does not prove its chunks did: a message the broker had
acknowledged after its last autosave is gone, while one still unacknowledged at the crash
is sent again by our client. So agents also say in their status which blob's fetch
stalled, and the coordinator publishes that blob's chunks again (at most once per blob
every ``BLOB_RESEND_S``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["RETAINED_CHECK_S", "RetainedKeeper"]

logger = logging.getLogger(__name__)

RETAINED_CHECK_S = 5.0
BLOB_RESEND_S = 10.0
MAX_TRACKED_BLOBS = 256


class RetainedKeeper:
    """Watches for the current release's retained manifest; calls ``republish`` when lost."""

    def __init__(
        self,
        *,
        current_manifest_topic: Callable[[], str | None],
        republish: Callable[[str], None],
        resend_blob: Callable[[str], bool],
        check_s: float = RETAINED_CHECK_S,
    ) -> None:
        self._current = current_manifest_topic
        self._republish = republish
        self._resend_blob = resend_blob
        self._resent_at: dict[str, float] = {}
        self._check_s = check_s
        self._seen = threading.Event()
        self._lock = threading.Lock()
        self._generation = 0
        self.republished = 0  # how many times the broker had to be told again
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    def stop(self) -> None:
        """No more republishing; wait for any under way (the caller closes the state next)."""
        self._stopped.set()
        self._seen.set()  # a check waiting for the manifest ends now
        for thread in list(self._threads):
            thread.join(30.0)

    def on_retained(self, topic: str, payload: bytes) -> None:
        """A message on a model manifest topic (network thread)."""
        if payload and topic == self._current():
            self._seen.set()

    def on_stalled_blob(self, digest: str) -> None:
        """An agent's status says a fetch of ``digest`` stalled (network thread)."""
        now = time.monotonic()
        with self._lock:
            if now - self._resent_at.get(digest, -BLOB_RESEND_S) < BLOB_RESEND_S:
                return
            if len(self._resent_at) >= MAX_TRACKED_BLOBS:  # statuses are anyone's to forge
                self._resent_at.clear()
            self._resent_at[digest] = now
        self._spawn(self._resend, digest, name="coordinator-resend")

    def _resend(self, digest: str) -> None:
        try:
            if self._resend_blob(digest):
                self.republished += 1
                logger.warning(
                    "an agent's fetch of blob %s stalled: chunks sent again", digest[:12]
                )
        except Exception:
            logger.exception("resending blob %s failed", digest[:12])

    def on_connected(self, session_present: bool) -> None:
        """After a reconnect (network thread): check, or republish, in a thread of its own."""
        with self._lock:
            self._generation += 1
            generation = self._generation
        self._seen.clear()
        why = None if session_present else "the broker had no session for the coordinator"
        self._spawn(self._check, generation, why, name="coordinator-retained")

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        if self._stopped.is_set():
            return
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _check(self, generation: int, why: str | None) -> None:
        if why is None:
            if self._current() is None or self._seen.wait(self._check_s):
                return
            why = "the current release's retained manifest is missing on the broker"
        with self._lock:
            if generation != self._generation or self._stopped.is_set():
                return  # a newer connection checks for itself, or we are stopping
        self.republished += 1
        logger.warning("%s: republishing the coordinator's retained messages", why)
        try:
            self._republish(why)
        except Exception:
            logger.exception("republishing the retained messages failed")
