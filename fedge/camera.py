"""``fedge camera``: publish frames from a camera, a video, an image folder or one image.

Stages, kept apart so ``fedge demo`` and the tests can drive each one:

- :func:`open_source` turns SOURCE into an iterator of :class:`SourceFrame`
  ``(image, label, name)``. Image files come out as their original bytes (never
  re-encoded) unless a resize is asked for; device and video frames come out as BGR
  ndarrays. Everything that can be checked before the first frame (missing path, empty
  folder, unopenable device, bad folder label) is checked at once, as a :class:`ConfigError`.
- :func:`publish_frames` paces frames at N fps on a monotonic clock, JPEG-encodes
  ndarrays, wraps them in the binary frame envelope if asked, and publishes them through
  an :class:`MqttLink`, keeping at most ``MAX_PENDING_FRAMES`` unconfirmed so a slow
  broker slows the camera down instead of filling memory.
- :data:`camera_command` is the click command; the ``fedge`` group registers it.

Delivery: QoS 0 (the default) is what a live camera wants: a frame produced while the
broker is unreachable is dropped, not queued. With QoS 1 nothing is dropped: frames wait
in the MQTT client until the broker acknowledges them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import click
from pydantic import ValidationError

from fedge.interrupts import INTERRUPTED_EXIT_STATUS, Interrupted, StopSignals
from protocol.errors import ConfigError, FrameError, PreprocessError, TopicError, TransportError
from protocol.frames import FrameMeta, encode_envelope, payload_shape
from protocol.topics import DEFAULT_FLEET, DEFAULT_ROOT, Topics, validate_filter

if TYPE_CHECKING:
    from numpy.typing import NDArray
    from rich.console import Console

    from runtime.mqtt import MqttLink

__all__ = [
    "DEFAULT_BROKER_URL",
    "DEFAULT_CAMERA_ID",
    "DEFAULT_FPS",
    "DEFAULT_JPEG_QUALITY",
    "IMAGE_SUFFIXES",
    "CameraReport",
    "PublishSettings",
    "SourceFrame",
    "camera_command",
    "open_source",
    "publish_frames",
]

logger = logging.getLogger(__name__)

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
DEFAULT_CAMERA_ID = "cam0"
DEFAULT_FPS = 5.0
MAX_FPS = 1000.0
DEFAULT_JPEG_QUALITY = 90
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MAX_RESIZE_PIXELS = 8192
# Matches paho's in-flight window in MqttLink: more would only queue inside paho.
MAX_PENDING_FRAMES = 32
CONNECT_TIMEOUT_S = 10.0
# How long the end of a run waits for the broker to confirm the last frames.
DRAIN_TIMEOUT_S = 10.0
# A QoS 1 window that stays full this long means the broker is gone for good.
ACK_STALL_TIMEOUT_S = 60.0
# paho forgets QoS 0 frames still in its buffer when the connection drops, without a callback.
QOS0_WRITE_TIMEOUT_S = 5.0
_WAIT_SLICE_S = 0.25
_DEVICE_PATH = re.compile(r"/dev/video(\d+)")
_RESIZE = re.compile(r"(\d+)[xX](\d+)")

Image: TypeAlias = "bytes | NDArray[Any]"
ProgressCallback: TypeAlias = "Callable[[CameraReport], None]"


class SourceFrame(NamedTuple):
    """One frame from a source: encoded image bytes or a BGR ndarray, its label, a name."""

    image: bytes | NDArray[Any]
    label: str | None
    name: str


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


# --- sources ---------------------------------------------------------------------------


def open_source(
    source: str,
    *,
    loop: bool = False,
    labels_from_folders: bool = False,
    resize: tuple[int, int] | None = None,
) -> Generator[SourceFrame, None, None]:
    """Open SOURCE: a device (``/dev/video0`` or an index), a video, a folder or an image.

    Folders yield their images sorted by path, case-insensitively matching
    :data:`IMAGE_SUFFIXES`; with ``labels_from_folders`` they are searched recursively and
    each image is labelled with the name of the folder it sits in. ``loop`` starts a
    folder, video or image over at its end. ``resize`` is ``(width, height)``.
    Close the returned generator to release a device or video at once.
    """
    device = _device_target(source)
    if device is not None:
        return _capture_frames(_CaptureSpec(device, source, is_device=True, resize=resize))
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"source {source} does not exist", reason="no_source")
    if path.is_dir():
        files = _folder_images(path, recursive=labels_from_folders)
        return _image_frames(files, loop=loop, resize=resize)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _image_frames([(path, None, path.name)], loop=loop, resize=resize)
    spec = _CaptureSpec(str(path), path.name, is_device=False, loop=loop, resize=resize)
    return _capture_frames(spec)


def _device_target(source: str) -> int | str | None:
    """A device index (or a device path OpenCV must open by name), or None for a file."""
    if source.isdigit():
        return int(source)
    if not source.startswith("/dev/"):
        return None
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"camera device {source} does not exist", reason="no_source")
    # OpenCV's V4L2 backend opens by index only; /dev/v4l/by-id/* links resolve to one.
    match = _DEVICE_PATH.fullmatch(str(path.resolve()))
    return int(match.group(1)) if match else source


def _folder_images(folder: Path, *, recursive: bool) -> list[tuple[Path, str | None, str]]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found: list[tuple[str, Path, str | None]] = []
    for path in candidates:
        relative = path.relative_to(folder)
        # Hidden files and folders are editor, VCS or OS droppings, never frames.
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        label = relative.parts[-2] if recursive and len(relative.parts) > 1 else None
        found.append((relative.as_posix(), path, label))
    if not found:
        where = f"{folder} or its subfolders" if recursive else str(folder)
        raise ConfigError(
            f"no images ({' '.join(sorted(IMAGE_SUFFIXES))}) in {where}", reason="no_source"
        )
    for label in sorted({label for _, _, label in found if label is not None}):
        _check_label(label, what=f"folder name {label!r}")
    found.sort(key=lambda item: item[0])
    return [(path, label, name) for name, path, label in found]


def _check_label(label: str, *, what: str) -> str:
    try:
        FrameMeta(label=label)
    except ValidationError as exc:
        raise ConfigError(
            f"{what} is not a usable label (1-64 letters, digits, _ . -)", reason="bad_label"
        ) from exc
    return label


def _image_frames(
    files: list[tuple[Path, str | None, str]],
    *,
    loop: bool,
    resize: tuple[int, int] | None,
) -> Generator[SourceFrame, None, None]:
    while True:
        produced = 0
        for path, label, name in files:
            image = _read_image_file(path, resize)
            if image is not None:
                produced += 1
                yield SourceFrame(image, label, name)
        if produced == 0:
            raise ConfigError(f"none of the {len(files)} image files could be read as an image")
        if not loop:
            return


def _read_image_file(path: Path, resize: tuple[int, int] | None) -> Image | None:
    """The file's bytes as they are, or a resized ndarray; None (logged) if not an image."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}", reason="no_source") from exc
    try:
        is_image = payload_shape(data).is_bare_image
    except FrameError:
        is_image = False
    if not is_image:
        logger.warning("skipping %s: not a JPEG, PNG, BMP or WebP image", path)
        return None
    if resize is None:
        return data
    import cv2
    import numpy as np

    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        logger.warning("skipping %s: OpenCV cannot decode it: %s", path, exc)
        return None
    if decoded is None:
        logger.warning("skipping %s: OpenCV cannot decode it", path)
        return None
    return _resized(decoded, resize)


def _resized(frame: NDArray[Any], resize: tuple[int, int] | None) -> NDArray[Any]:
    if resize is None:
        return frame
    import cv2

    try:
        return cv2.resize(frame, resize, interpolation=cv2.INTER_AREA)
    except cv2.error as exc:
        raise PreprocessError(f"cannot resize a frame to {resize[0]}x{resize[1]}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _CaptureSpec:
    target: int | str
    name: str
    is_device: bool
    loop: bool = False
    resize: tuple[int, int] | None = field(default=None, kw_only=True)


def _capture_frames(spec: _CaptureSpec) -> Generator[SourceFrame, None, None]:
    # Opened here, before the first next(), so a bad device or video fails at once.
    capture = _open_capture(spec)
    return _read_capture(spec, capture)


def _open_capture(spec: _CaptureSpec) -> Any:
    import cv2

    what = "camera device" if spec.is_device else "video"
    try:
        if isinstance(spec.target, int):
            backend = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
            capture = cv2.VideoCapture(spec.target, backend)
        else:
            capture = cv2.VideoCapture(spec.target)
    except cv2.error as exc:
        raise ConfigError(f"cannot open {what} {spec.name}: {exc}", reason="no_source") from exc
    if not capture.isOpened():
        capture.release()
        raise ConfigError(f"cannot open {what} {spec.name}", reason="no_source")
    if spec.is_device:
        # V4L2 queues several frames by default; at a low rate they would all be stale.
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    return capture


def _read_capture(spec: _CaptureSpec, capture: Any) -> Generator[SourceFrame, None, None]:
    import cv2

    index = 0
    try:
        while True:
            produced = 0
            while True:
                try:
                    ok, frame = capture.read()
                except cv2.error as exc:
                    raise ConfigError(f"reading from {spec.name} failed: {exc}") from exc
                if not ok or frame is None:
                    break
                produced += 1
                yield SourceFrame(_resized(frame, spec.resize), None, f"{spec.name}#{index}")
                index += 1
            if spec.is_device:
                logger.warning("camera %s stopped delivering frames", spec.name)
                return
            if produced == 0:
                raise ConfigError(f"video {spec.name} has no readable frames", reason="no_source")
            if not spec.loop:
                return
            capture.release()
            capture = _open_capture(spec)
    finally:
        capture.release()


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


# --- command line ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _CommandOptions:
    fps: float
    count: int | None
    loop: bool
    envelope: bool
    label: str | None
    labels_from_folders: bool
    resize: tuple[int, int] | None
    jpeg_quality: int
    qos: int
    topic: str | None
    broker_url: str
    username: str | None
    password: str | None
    fleet: str
    root: str
    camera_id: str

    def settings(self) -> PublishSettings:
        return PublishSettings(
            fps=self.fps,
            count=self.count,
            envelope=self.envelope,
            camera_id=self.camera_id,
            qos=self.qos,
            jpeg_quality=self.jpeg_quality,
        )


def _parse_resize(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    match = _RESIZE.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 64x64")
    width, height = int(match.group(1)), int(match.group(2))
    if not (1 <= width <= MAX_RESIZE_PIXELS and 1 <= height <= MAX_RESIZE_PIXELS):
        raise click.BadParameter(f"width and height must be in 1..{MAX_RESIZE_PIXELS}")
    return width, height


def _validate_label(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return _check_label(value, what=f"label {value!r}")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc


def _frames_topic(options: _CommandOptions) -> str:
    if options.topic is None:
        return Topics(root=options.root, fleet=options.fleet).camera_frames(options.camera_id)
    validate_filter(options.topic)
    if any(level in {"+", "#"} for level in options.topic.split("/")):
        raise TopicError(f"--topic {options.topic!r} must be a concrete topic, not a filter")
    return options.topic


def _progress_line(report: CameraReport) -> str:
    from rich.filesize import decimal

    return (
        f"{_frames(report.frames_sent)}, {report.fps:.1f} fps, {decimal(report.bytes_sent)} "
        f"-> {report.topic}"
    )


def _frames(count: int) -> str:
    return f"{count} frame" if count == 1 else f"{count} frames"


def _summary_line(report: CameraReport) -> str:
    from rich.filesize import decimal

    parts = [
        f"sent {_frames(report.frames_sent)} ({decimal(report.bytes_sent)}) to {report.topic} "
        f"in {report.elapsed_s:.1f} s at {report.fps:.1f} fps"
    ]
    if report.frames_dropped:
        parts.append(f"{report.frames_dropped} dropped while disconnected")
    if report.frames_unconfirmed:
        parts.append(f"{report.frames_unconfirmed} not confirmed by the broker")
    if report.interrupted:
        parts.append("stopped early")
    return "; ".join(parts)


@contextlib.contextmanager
def _live_progress(console: Console) -> Iterator[ProgressCallback]:
    from rich.live import Live
    from rich.text import Text

    with Live(
        Text("waiting for the first frame"), console=console, transient=True, refresh_per_second=4
    ) as live:

        def update(report: CameraReport) -> None:
            live.update(Text(_progress_line(report)))

        yield update


_HELP = """Publish frames from SOURCE to the broker at --fps frames per second.

SOURCE is a camera (/dev/video0, or an index such as 0), a video file, a folder of
images (.jpg .jpeg .png .bmp .webp, sorted by name) or a single image. Image files are
sent as they are; camera and video frames are sent as JPEG. Frames go to
<root>/<fleet>/cameras/<camera>/frames unless --topic says otherwise.

\b
Examples:
  fedge camera ./digits --fps 10 --envelope
  fedge camera ./labelled --labels-from-folders --envelope --loop
  fedge camera /dev/video0 --camera door
  fedge camera clip.mp4 --loop --resize 320x240
  fedge camera photo.jpg --count 1 --topic site/gate/frames
"""


@click.command("camera", help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option(
    "--fps",
    type=click.FloatRange(0, MAX_FPS),
    default=DEFAULT_FPS,
    show_default=True,
    help="Frames per second; 0 sends as fast as possible.",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after N frames.")
@click.option("--loop", is_flag=True, help="Start a folder, video or image over at its end.")
@click.option(
    "--envelope",
    is_flag=True,
    help="Wrap each frame in the fedge envelope (frame id, timestamp, label).",
)
@click.option(
    "--label",
    default=None,
    callback=_validate_label,
    help="Label every frame with L (needs --envelope).",
    metavar="L",
)
@click.option(
    "--labels-from-folders",
    is_flag=True,
    help="Read FOLDER/<label>/<image> recursively, labelling by folder name.",
)
@click.option(
    "--resize",
    default=None,
    callback=_parse_resize,
    metavar="WxH",
    help="Resize every frame (image files are then re-encoded as JPEG).",
)
@click.option(
    "--jpeg-quality",
    type=click.IntRange(1, 100),
    default=DEFAULT_JPEG_QUALITY,
    show_default=True,
    help="JPEG quality of camera, video and resized frames.",
)
@click.option(
    "--qos",
    type=click.IntRange(0, 1),
    default=0,
    show_default=True,
    help="MQTT QoS: 0 drops frames while disconnected, 1 never does.",
)
@click.option("--topic", default=None, help="Publish to this exact topic instead.")
@click.option(
    "--broker",
    "broker_url",
    default=DEFAULT_BROKER_URL,
    show_default=True,
    envvar="FEDGE_BROKER_URL",
    help="mqtt://host:port or mqtts://host:port.",
)
@click.option("--username", default=None, envvar="FEDGE_USERNAME", help="Broker user name.")
@click.option("--password", default=None, envvar="FEDGE_PASSWORD", help="Broker password.")
@click.option("--fleet", default=DEFAULT_FLEET, show_default=True, help="Fleet name.")
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="Topic root.")
@click.option(
    "--camera",
    "camera_id",
    default=DEFAULT_CAMERA_ID,
    show_default=True,
    help="This camera's id, part of the topic and of each frame id.",
)
def camera_command(source: str, **raw_options: Any) -> None:
    from rich.console import Console

    from runtime.mqtt import MqttLink, parse_broker_url

    options = _CommandOptions(**raw_options)
    if options.label is not None and not options.envelope:
        raise click.UsageError("--label needs --envelope: a bare image carries no label")
    if options.label is not None and options.labels_from_folders:
        raise click.UsageError("use either --label or --labels-from-folders, not both")
    settings = options.settings()
    topic = _frames_topic(options)
    address = parse_broker_url(
        options.broker_url, username=options.username, password=options.password
    )
    frames = open_source(
        source,
        loop=options.loop,
        labels_from_folders=options.labels_from_folders,
        resize=options.resize,
    )
    labelled: Iterable[tuple[Image, str | None, str]] = frames
    if options.label is not None:
        fixed = options.label
        labelled = ((image, fixed, name) for image, _, name in frames)
    console = Console(stderr=True)
    link = MqttLink(
        address,
        client_id=f"fedge-camera-{options.camera_id}-{uuid.uuid4().hex[:8]}",
        clean_session=True,
    )
    stop = threading.Event()
    # Ctrl-C (or SIGTERM) ends the run after the current frame; a second Ctrl-C at once.
    with StopSignals() as stops:
        stops.on_stop(stop.set)
        try:
            link.start()
            link.wait_connected(CONNECT_TIMEOUT_S)
            stops.check()
            with _live_progress(console) as on_progress:
                report = publish_frames(
                    link,
                    labelled,
                    topic=topic,
                    settings=settings,
                    on_progress=on_progress,
                    stop=stop,
                )
        except Interrupted:
            raise SystemExit(INTERRUPTED_EXIT_STATUS) from None
        finally:
            frames.close()
            link.stop()
        console.print(_summary_line(report), soft_wrap=True, highlight=False, markup=False)
    stops.exit_if_interrupted()
