"""Slow and lossy links in user space: latency, jitter, bandwidth, stalls and loss bursts.

:class:`LinkProfile` describes one direction of a link (both directions get the same
profile); :class:`ShapedPipe` carries one TCP direction through it. A pipe reads what the
sender writes into a bounded buffer (the bottleneck's queue: once it is full the sender's
socket fills up, as behind a real slow link) and a writer thread delivers each piece no
sooner than its one-way latency plus jitter after it was read, never out of order, paced to
the bandwidth, and not at all while the link is stalled.

TCP never loses a byte it acknowledged, so what a lossy path does to a TCP stream is delay:
a loss burst holds everything back until retransmission gets through (the burst plus a
retransmission timeout). Loss bursts are therefore random stalls (seeded), and periodic
stalls model a link that goes quiet now and then (a Wi-Fi roam, an LTE handover).

The kernel's ``netem`` would do the same below TCP; it is not available on these machines
(see ``fedge.harness.netns`` for bandwidth through ``tbf`` in a network namespace, as root).
"""

from __future__ import annotations

import bisect
import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CLEAN", "PROFILES", "CountBytes", "LinkProfile", "Schedule", "ShapedPipe"]

logger = logging.getLogger(__name__)

RECV_BYTES = 16 * 1024
DEFAULT_BUFFER_BYTES = 64 * 1024
# Paced sends go out in slices of this much link time, so a big read does not leave in
# one burst at the start of its time slot.
PACING_SLICE_S = 0.02
# A retransmission timeout on top of a loss burst (Linux's minimum RTO is 200 ms).
RETRANSMIT_S = 0.2
WAKE_S = 0.05
SCHEDULE_HORIZON_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """One direction of a link; ``rtt_s`` is twice ``latency_s`` for a symmetric link."""

    name: str = "clean"
    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float | None = None
    stall_every_s: float | None = None
    stall_s: float = 0.0
    loss_bursts_per_min: float = 0.0
    loss_burst_s: float = 0.0
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    seed: int = 0

    @property
    def rtt_s(self) -> float:
        return 2 * self.latency_s

    @property
    def shaped(self) -> bool:
        return self != LinkProfile(name=self.name, buffer_bytes=self.buffer_bytes, seed=self.seed)

    def describe(self) -> str:
        parts = [f"rtt {self.rtt_s * 1000:.0f} ms"] if self.latency_s else []
        if self.jitter_s:
            parts.append(f"jitter {self.jitter_s * 1000:.0f} ms")
        if self.bandwidth_bps:
            parts.append(f"{self.bandwidth_bps / 1000:.0f} kbit/s")
        if self.stall_every_s:
            parts.append(f"{self.stall_s:g} s stall every {self.stall_every_s:g} s")
        if self.loss_bursts_per_min:
            parts.append(f"{self.loss_bursts_per_min:g} loss bursts/min of {self.loss_burst_s:g} s")
        return ", ".join(parts) or "clean"


CLEAN = LinkProfile()
PROFILES = {
    profile.name: profile
    for profile in (
        CLEAN,
        LinkProfile(name="wifi", latency_s=0.01, jitter_s=0.01, loss_bursts_per_min=6,
                    loss_burst_s=0.3),
        LinkProfile(name="lte", latency_s=0.075, jitter_s=0.03, bandwidth_bps=2_000_000,
                    loss_bursts_per_min=4, loss_burst_s=0.5),
        LinkProfile(name="bad-lte", latency_s=0.15, jitter_s=0.05, bandwidth_bps=256_000,
                    stall_every_s=30.0, stall_s=10.0),
    )
}  # fmt: skip


class Schedule:
    """When the link is down: periodic stalls and seeded random loss bursts."""

    def __init__(self, profile: LinkProfile, start: float) -> None:
        self._profile = profile
        self._start = start
        self._bursts: list[tuple[float, float]] = []
        if profile.loss_bursts_per_min > 0 and profile.loss_burst_s > 0:
            rng = random.Random(profile.seed)  # noqa: S311 - a seeded simulation, not secrecy
            at = 0.0
            while at < SCHEDULE_HORIZON_S:
                at += rng.expovariate(profile.loss_bursts_per_min / 60.0)
                self._bursts.append((start + at, start + at + profile.loss_burst_s + RETRANSMIT_S))
        self._burst_starts = [b[0] for b in self._bursts]

    def open_at(self, now: float) -> float:
        """The first moment at or after ``now`` at which the link delivers again."""
        while True:
            later = max(self._stall_end(now), self._burst_end(now))
            if later <= now:
                return now
            now = later

    def _stall_end(self, now: float) -> float:
        every, length = self._profile.stall_every_s, self._profile.stall_s
        if not every or length <= 0:
            return now
        # The link is up for `every - length`, then down for `length`, over and over.
        phase = (now - self._start) % every
        return now + (every - phase) if phase >= every - length else now

    def _burst_end(self, now: float) -> float:
        position = bisect.bisect_right(self._burst_starts, now) - 1
        if position >= 0 and self._bursts[position][1] > now:
            return self._bursts[position][1]
        return now


class CountBytes:
    """A thread-safe byte counter the pipes add to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def __call__(self, count: int) -> None:
        with self._lock:
            self.value += count


class ShapedPipe:
    """One direction: ``source`` -> profile -> ``sink``; ``on_end`` runs once when it ends."""

    def __init__(
        self,
        source: socket.socket,
        sink: socket.socket,
        profile: LinkProfile,
        *,
        start: float,
        count: CountBytes,
        on_end: Callable[[], None],
        name: str,
    ) -> None:
        self._source, self._sink, self._profile = source, sink, profile
        self._schedule = Schedule(profile, start)
        self._rng = random.Random(profile.seed + 1)  # noqa: S311 - seeded jitter
        self._count = count
        self._on_end = on_end
        self._queue: deque[tuple[float, bytes]] = deque()
        self._queued_bytes = 0
        self._condition = threading.Condition()
        self._eof = False
        self._stopped = threading.Event()
        self._last_due = 0.0
        self.threads = [
            threading.Thread(target=self._read, name=f"{name}-read", daemon=True),
            threading.Thread(target=self._write, name=f"{name}-write", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._condition:
            self._condition.notify_all()

    def _read(self) -> None:
        try:
            while not self._stopped.is_set():
                data = self._source.recv(RECV_BYTES)
                if not data:
                    break
                with self._condition:
                    # The bottleneck queue: while it is full, nothing more is read, so the
                    # sender's socket buffer fills and it feels the slow link.
                    while (
                        self._queued_bytes + len(data) > self._profile.buffer_bytes
                        and self._queue
                        and not self._stopped.is_set()
                    ):
                        self._condition.wait(WAKE_S)
                    jitter = self._rng.uniform(0.0, self._profile.jitter_s)
                    due = max(time.monotonic() + self._profile.latency_s + jitter, self._last_due)
                    self._last_due = due
                    self._queue.append((due, data))
                    self._queued_bytes += len(data)
                    self._condition.notify_all()
        except OSError as exc:
            logger.debug("shaped pipe read ended: %s", exc)
        with self._condition:
            self._eof = True
            self._condition.notify_all()

    def _write(self) -> None:
        next_send = 0.0
        try:
            while not self._stopped.is_set():
                with self._condition:
                    while not self._queue and not self._eof and not self._stopped.is_set():
                        self._condition.wait(WAKE_S)
                    if not self._queue:
                        break
                    due, data = self._queue[0]
                self._sleep_until(due)
                view = memoryview(data)
                while view and not self._stopped.is_set():
                    self._sleep_until(self._schedule.open_at(time.monotonic()))
                    piece = view[: self._slice_bytes()]
                    if self._profile.bandwidth_bps:
                        next_send = max(next_send, time.monotonic())
                        self._sleep_until(next_send)
                        next_send += len(piece) * 8 / self._profile.bandwidth_bps
                    self._sink.sendall(piece)
                    self._count(len(piece))
                    view = view[len(piece) :]
                with self._condition:
                    self._queue.popleft()
                    self._queued_bytes -= len(data)
                    self._condition.notify_all()
        except OSError as exc:
            logger.debug("shaped pipe write ended: %s", exc)
        self.stop()
        self._on_end()

    def _slice_bytes(self) -> int:
        if not self._profile.bandwidth_bps:
            return RECV_BYTES
        return max(1, int(self._profile.bandwidth_bps / 8 * PACING_SLICE_S))

    def _sleep_until(self, moment: float) -> None:
        delay = moment - time.monotonic()
        if delay > 0:
            self._stopped.wait(delay)
