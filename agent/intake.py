"""Frame intake: latest frame wins, per source, so a slow model never builds a backlog.

The network thread ``offer``s frames; the inference worker ``take``s them. Each source
holds at most one pending frame: a newer one replaces it (counted as dropped stale). A
source may be limited to ``max_fps``: a frame that arrives sooner than ``1 / max_fps``
after the last accepted one from the same source is dropped (counted). Sources are served
round-robin, so one busy camera cannot starve another.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FrameCounts", "FrameIntake", "PendingFrame"]

MAX_SOURCES = 1024


@dataclass(frozen=True, slots=True)
class PendingFrame:
    source: str
    topic: str
    payload: bytes
    received_at: float  # wall clock, seconds since the epoch


@dataclass(slots=True)
class FrameCounts:
    received: int = 0
    processed: int = 0
    dropped_stale: int = 0
    dropped_rate: int = 0
    rejected: int = 0


class FrameIntake:
    def __init__(
        self,
        *,
        max_fps: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts = FrameCounts()
        self._max_fps = max_fps
        self._monotonic = monotonic
        self._pending: OrderedDict[str, PendingFrame] = OrderedDict()
        self._last_accepted: OrderedDict[str, float] = OrderedDict()
        self._condition = threading.Condition()
        self._closed = False

    @property
    def max_fps(self) -> float | None:
        return self._max_fps

    def set_max_fps(self, max_fps: float | None) -> None:
        with self._condition:
            self._max_fps = max_fps

    def offer(self, frame: PendingFrame) -> None:
        with self._condition:
            self.counts.received += 1
            now = self._monotonic()
            last = self._last_accepted.get(frame.source)
            if self._max_fps and last is not None and now - last < 1.0 / self._max_fps:
                self.counts.dropped_rate += 1
                return
            if frame.source in self._pending:
                self.counts.dropped_stale += 1
                del self._pending[frame.source]  # re-queue at the back: round-robin
            elif len(self._pending) >= MAX_SOURCES:
                self.counts.dropped_stale += 1
                return
            self._pending[frame.source] = frame
            self._last_accepted[frame.source] = now
            self._last_accepted.move_to_end(frame.source)
            if len(self._last_accepted) > MAX_SOURCES:
                self._last_accepted.popitem(last=False)
            self._condition.notify()

    def take(self, timeout_s: float) -> PendingFrame | None:
        """The oldest source's latest frame, or None after ``timeout_s`` or once closed."""
        with self._condition:
            if not self._condition.wait_for(lambda: self._pending or self._closed, timeout_s):
                return None
            if not self._pending:
                return None
            _, frame = self._pending.popitem(last=False)
            return frame

    def finish(self, *, processed: bool) -> None:
        """Count a taken frame as processed or rejected (under the lock, so counts add up)."""
        with self._condition:
            if processed:
                self.counts.processed += 1
            else:
                self.counts.rejected += 1

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def pending_count(self) -> int:
        with self._condition:
            return len(self._pending)
