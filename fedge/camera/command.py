"""``fedge camera``: the click command on top of the sources and the publisher."""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from fedge.control.interrupts import INTERRUPTED_EXIT_STATUS, Interrupted, StopSignals
from protocol.errors import ConfigError, TopicError
from protocol.topics import DEFAULT_FLEET, DEFAULT_ROOT, Topics, validate_filter

if TYPE_CHECKING:
    from rich.console import Console


from fedge.camera.publishing import CameraReport, ProgressCallback, PublishSettings, publish_frames
from fedge.camera.sources import (
    _RESIZE,
    CONNECT_TIMEOUT_S,
    DEFAULT_BROKER_URL,
    DEFAULT_CAMERA_ID,
    DEFAULT_FPS,
    DEFAULT_JPEG_QUALITY,
    MAX_FPS,
    MAX_RESIZE_PIXELS,
    Image,
    _check_label,
    open_source,
)

__all__ = [
    "camera_command",
]

logger = logging.getLogger(__name__)

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
