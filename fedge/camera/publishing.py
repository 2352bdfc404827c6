"""Frames to the broker at N fps, with at most ``MAX_PENDING_FRAMES`` unconfirmed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from pydantic import ValidationError

from protocol.errors import ConfigError, PreprocessError, TransportError
from protocol.frames import FrameMeta, encode_envelope

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from runtime.mqtt import MqttLink

from fedge.camera.sources import (
    _WAIT_SLICE_S,
    ACK_STALL_TIMEOUT_S,
    DEFAULT_CAMERA_ID,
    DEFAULT_FPS,
    DEFAULT_JPEG_QUALITY,
    DRAIN_TIMEOUT_S,
    MAX_FPS,
    MAX_PENDING_FRAMES,
    QOS0_WRITE_TIMEOUT_S,
    Image,
)

__all__ = [
    "CameraReport",
    "ProgressCallback",
    "PublishSettings",
    "publish_frames",
]

logger = logging.getLogger(__name__)

ProgressCallback: TypeAlias = "Callable[[CameraReport], None]"


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishSettings:
    """How :func:`publish_frames` sends frames.

    ``fps`` 0 sends as fast as the broker takes them; ``count`` ``None`` sends until the
    source ends; ``camera_id`` goes into each envelope's ``frame_id`` (``<camera>-<seq>``).
    """

    fps: float = DEFAULT_FPS
    count: int | None = None
    envelope: bool = False
    camera_id: str = DEFAULT_CAMERA_ID
    qos: int = 0
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self) -> None:
        if not 0 <= self.fps <= MAX_FPS:
            raise ConfigError(f"fps {self.fps} is not in 0..{MAX_FPS:g}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count {self.count} must be at least 1")
        if self.qos not in {0, 1}:
            raise ConfigError(f"qos {self.qos} must be 0 or 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"JPEG quality {self.jpeg_quality} is not in 1..100")


@dataclass(frozen=True, slots=True)
class CameraReport:
    """What a run of :func:`publish_frames` did so far (or in total, once it returned)."""

    topic: str
    frames_sent: int = 0
    bytes_sent: int = 0
    frames_confirmed: int = 0
    frames_dropped: int = 0
    elapsed_s: float = 0.0
    # Between the first and the last publish: the honest base for the achieved rate.
    sending_span_s: float = 0.0
    interrupted: bool = False

    @property
    def fps(self) -> float:
        if self.frames_sent < 2 or self.sending_span_s <= 0:
            return 0.0
        return (self.frames_sent - 1) / self.sending_span_s

    @property
    def frames_unconfirmed(self) -> int:
        return self.frames_sent - self.frames_confirmed


# --- publishing ------------------------------------------------------------------------


class _Confirmations:
    """Frames handed to the MQTT link that the broker has not confirmed yet.

    For QoS 1 a confirmation is the broker's PUBACK; for QoS 0 it is paho writing the
    frame to the socket.
    """

    def __init__(self, *, qos: int) -> None:
        self._qos = qos
        self._condition = threading.Condition()
        self._pending: dict[int, float] = {}
        self._next_ticket = 0
        self._last_progress = time.monotonic()
        self.confirmed = 0

    def track(self) -> Callable[[], None]:
        """Register one frame about to be published; the result confirms it."""
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._pending[ticket] = time.monotonic()

        def confirm() -> None:
            with self._condition:
                if self._pending.pop(ticket, None) is not None:
                    self.confirmed += 1
                    self._last_progress = time.monotonic()
                    self._condition.notify_all()

        return confirm

    def wait_for_room(self, limit: int, stop: threading.Event) -> bool:
        """Block until fewer than ``limit`` frames are pending; False if ``stop`` was set."""
        with self._condition:
            while len(self._pending) >= limit:
                if stop.is_set():
                    return False
                self._forget_lost_qos0()
                if len(self._pending) < limit:
                    break
                stalled_s = time.monotonic() - self._last_progress
                if stalled_s > ACK_STALL_TIMEOUT_S:
                    raise TransportError(
                        f"the broker confirmed no frame for {stalled_s:.0f} s",
                        reason="stalled",
                    )
                self._condition.wait(_WAIT_SLICE_S)
        return True

    def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every pending frame; return how many are left."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._pending:
                self._forget_lost_qos0()
                remaining_s = deadline - time.monotonic()
                if not self._pending or remaining_s <= 0:
                    break
                self._condition.wait(min(remaining_s, _WAIT_SLICE_S))
            return len(self._pending)

    def _forget_lost_qos0(self) -> None:
        if self._qos != 0:
            return
        cutoff = time.monotonic() - QOS0_WRITE_TIMEOUT_S
        for ticket in [t for t, sent_at in self._pending.items() if sent_at < cutoff]:
            del self._pending[ticket]


@dataclass(slots=True)
class _Run:
    """Mutable counters of one publishing run."""

    topic: str
    started_at: float
    sent: int = 0
    bytes_sent: int = 0
    dropped: int = 0
    first_at: float | None = None
    last_at: float | None = None
    interrupted: bool = False

    def report(self, confirmed: int) -> CameraReport:
        span_s = 0.0
        if self.first_at is not None and self.last_at is not None:
            span_s = self.last_at - self.first_at
        return CameraReport(
            topic=self.topic,
            frames_sent=self.sent,
            bytes_sent=self.bytes_sent,
            frames_confirmed=confirmed,
            frames_dropped=self.dropped,
            elapsed_s=time.monotonic() - self.started_at,
            sending_span_s=span_s,
            interrupted=self.interrupted,
        )


def publish_frames(
    link: MqttLink,
    frames: Iterable[tuple[Image, str | None, str]],
    *,
    topic: str,
    settings: PublishSettings | None = None,
    on_progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> CameraReport:
    """Publish ``frames`` to ``topic`` through a started ``link``; return what was sent.

    Stops when the source ends, after ``settings.count`` frames, or once ``stop`` is set;
    then waits (up to ``DRAIN_TIMEOUT_S``) for the broker to confirm the last frames.
    ``on_progress`` gets a fresh :class:`CameraReport` after every frame.
    """
    settings = settings if settings is not None else PublishSettings()
    stop = stop if stop is not None else threading.Event()
    confirmations = _Confirmations(qos=settings.qos)
    run = _Run(topic=topic, started_at=time.monotonic())
    period_s = 1.0 / settings.fps if settings.fps > 0 else 0.0
    next_at = run.started_at
    iterator = iter(frames)
    seq = 0
    while settings.count is None or run.sent < settings.count:
        if _wait_until(next_at, stop):
            run.interrupted = True
            break
        try:
            image, label, name = next(iterator)
        except StopIteration:
            break
        payload = _payload(image, label, f"{settings.camera_id}-{seq}", settings)
        seq += 1
        if settings.qos == 0 and not link.is_connected:
            run.dropped += 1
            logger.debug("dropped %s: not connected", name)
        elif confirmations.wait_for_room(MAX_PENDING_FRAMES, stop):
            link.publish(topic, payload, qos=settings.qos, on_ack=confirmations.track())
            now = time.monotonic()
            run.first_at = now if run.first_at is None else run.first_at
            run.last_at = now
            run.sent += 1
            run.bytes_sent += len(payload)
        else:
            run.interrupted = True
            break
        # Keep the schedule through small delays; after a long stall catch up one frame at most.
        next_at = max(next_at + period_s, time.monotonic() - period_s)
        if on_progress is not None:
            on_progress(run.report(confirmations.confirmed))
    left = confirmations.drain(DRAIN_TIMEOUT_S)
    if left:
        logger.warning("%d frames not confirmed by the broker within %g s", left, DRAIN_TIMEOUT_S)
    return run.report(confirmations.confirmed)


def _wait_until(deadline: float, stop: threading.Event) -> bool:
    """Sleep until the monotonic ``deadline``; True if ``stop`` was set meanwhile."""
    delay_s = deadline - time.monotonic()
    if delay_s > 0:
        return stop.wait(delay_s)
    return stop.is_set()


def _payload(image: Image, label: str | None, frame_id: str, settings: PublishSettings) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    else:
        data = _encode_jpeg(image, settings.jpeg_quality)
    if not settings.envelope:
        return data
    try:
        meta = FrameMeta(frame_id=frame_id, timestamp=time.time(), label=label)
    except ValidationError as exc:
        raise ConfigError(f"frame {frame_id} has an unusable label {label!r}") from exc
    return encode_envelope(data, meta)


def _encode_jpeg(frame: NDArray[Any], quality: int) -> bytes:
    import cv2

    try:
        ok, buffer = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    except cv2.error as exc:
        raise PreprocessError(f"cannot encode a frame as JPEG: {exc}") from exc
    if not ok:
        raise PreprocessError("cannot encode a frame as JPEG")
    return bytes(buffer.tobytes())
