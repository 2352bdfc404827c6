"""Where frames come from: a V4L2 device, a video file, an image folder or one image."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from pydantic import ValidationError

from protocol.errors import ConfigError, FrameError, PreprocessError
from protocol.frames import FrameMeta, payload_shape

if TYPE_CHECKING:
    from numpy.typing import NDArray


__all__ = [
    "ACK_STALL_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "DEFAULT_BROKER_URL",
    "DEFAULT_CAMERA_ID",
    "DEFAULT_FPS",
    "DEFAULT_JPEG_QUALITY",
    "DRAIN_TIMEOUT_S",
    "IMAGE_SUFFIXES",
    "MAX_FPS",
    "MAX_PENDING_FRAMES",
    "MAX_RESIZE_PIXELS",
    "Image",
    "SourceFrame",
    "open_source",
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


class SourceFrame(NamedTuple):
    """One frame from a source: encoded image bytes or a BGR ndarray, its label, a name."""

    image: bytes | NDArray[Any]
    label: str | None
    name: str


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
