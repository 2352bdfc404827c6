"""Putting the coordinator's retained messages back when the broker has lost them.

fedge keeps the fleet's shared state in retained messages: the current release's manifest
and blob chunks, the round announcement, the coordinator's status. A broker restarted
without persistence, restarted from a database older than its last changes (Mosquitto
saves every ``autosave_interval``), or a recreated container, has forgotten some or all of
them, and agents then wait for chunks that never come. So after every reconnect:

- session present false: the broker has forgotten us, so it has forgotten our retained
  messages too; republish everything at once;
- session present true: the broker's database may still be older than our last
  change; re-subscribing brings back the retained manifest of the current release and
  the open round's announcement, and if either has not come within ``RETAINED_CHECK_S``,
  republish everything. The announcement needs its own check: a broker killed between
  an announcement and its next autosave comes back with the release but not the round,
  and an agent that was offline then would never hear of it.

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
from typing import TYPE_CHECKING

from protocol.errors import FedgeError
from protocol.messages.codec import decode_message
from protocol.messages.rounds import RoundAnnouncement
from protocol.signing import SignedMessage

if TYPE_CHECKING:
    from coordinator.rounds import RoundRunner
    from coordinator.state import CoordinatorState
    from protocol.topics import Topics

__all__ = ["RETAINED_CHECK_S", "RetainedKeeper", "expected_retained"]

logger = logging.getLogger(__name__)

RETAINED_CHECK_S = 5.0
BLOB_RESEND_S = 10.0
MAX_TRACKED_BLOBS = 256


def expected_retained(
    state: CoordinatorState, runner: RoundRunner, topics: Topics
) -> dict[str, Callable[[bytes], bool]]:
    """The fleet's own retained topics that must survive, each with a check of its payload.

    Any manifest of the current version is ours (its topic names the version); on the one
    announcement topic, only the open round's announcement counts: a database saved before
    it still holds the previous round's.
    """
    version = state.get("current_version")
    if not version:
        return {}
    expected: dict[str, Callable[[bytes], bool]] = {
        topics.model_manifest(version): lambda _payload: True
    }
    announcement = runner.open_announcement()
    if announcement is not None:
        expected[topics.round_current()] = lambda payload: _announces(payload, announcement.round)
    return expected


def _announces(payload: bytes, round_number: int) -> bool:
    try:
        signed = decode_message(payload, SignedMessage)
        return RoundAnnouncement.model_validate_json(signed.body).round == round_number
    except (FedgeError, ValueError):
        return False


class RetainedKeeper:
    """Watches for the retained messages we own; calls ``republish`` when one is lost.

    ``expected_retained`` names the topics whose retained message must come back after a
    reconnect, each with a check of what came: the current release's manifest and, while a
    round is open, its announcement.
    """

    def __init__(
        self,
        *,
        expected_retained: Callable[[], dict[str, Callable[[bytes], bool]]],
        republish: Callable[[str], None],
        resend_blob: Callable[[str], bool],
        check_s: float = RETAINED_CHECK_S,
    ) -> None:
        self._expected = expected_retained
        self._republish = republish
        self._resend_blob = resend_blob
        self._resent_at: dict[str, float] = {}
        self._check_s = check_s
        self._seen: dict[str, bytes] = {}
        self._seen_changed = threading.Condition()
        self._lock = threading.Lock()
        self._generation = 0
        self.republished = 0  # how many times the broker had to be told again
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    def stop(self) -> None:
        """No more republishing; wait for any under way (the caller closes the state next)."""
        self._stopped.set()
        with self._seen_changed:
            self._seen_changed.notify_all()  # a check waiting for its messages ends now
        for thread in list(self._threads):
            thread.join(30.0)

    def on_retained(self, topic: str, payload: bytes) -> None:
        """A message on a manifest or announcement topic (network thread)."""
        if payload:
            with self._seen_changed:
                self._seen[topic] = payload
                self._seen_changed.notify_all()

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
        with self._seen_changed:
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
            missing = self._wait_for_expected()
            if not missing or self._stopped.is_set():
                return
            why = f"retained {', '.join(missing)} missing on the broker"
        with self._lock:
            if generation != self._generation or self._stopped.is_set():
                return  # a newer connection checks for itself, or we are stopping
        self.republished += 1
        logger.warning("%s: republishing the coordinator's retained messages", why)
        try:
            self._republish(why)
        except Exception:
            logger.exception("republishing the retained messages failed")

    def _wait_for_expected(self) -> list[str]:
        """The expected topics whose retained message has not come back within the check."""
        deadline = time.monotonic() + self._check_s
        expected = self._expected()
        with self._seen_changed:
            while True:
                missing = [
                    topic
                    for topic, holds in expected.items()
                    if topic not in self._seen or not holds(self._seen[topic])
                ]
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0 or self._stopped.is_set():
                    return missing
                self._seen_changed.wait(remaining)
