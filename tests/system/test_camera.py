"""`fedge camera` against a real Mosquitto: folders, video files, envelopes and bare frames."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import click
import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import skimage
from click.testing import CliRunner, Result
from sklearn.datasets import load_digits

from fedge.camera import CameraReport, PublishSettings, camera_command, open_source, publish_frames
from fedge.cli import cli
from protocol.frames import PayloadShape, decode_frame, payload_shape
from protocol.topics import Topics
from runtime.mqtt import MqttLink, parse_broker_url
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    publish,
    subscribe,
)

pytestmark = pytest.mark.broker

DIGIT_COUNT = 12
DIGIT_SIDE_PX = 64
VIDEO_FRAMES = 6
VIDEO_SIZE_PX = (160, 120)
FAST_FPS = "200"
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"


# --- data ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_images() -> list[tuple[np.ndarray, str]]:
    """The first DIGIT_COUNT scikit-learn digits, upscaled to 64x64 grey images."""
    digits = load_digits()
    images = []
    for pixels, target in zip(
        digits.images[:DIGIT_COUNT], digits.target[:DIGIT_COUNT], strict=True
    ):
        grey = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
        big = cv2.resize(grey, (DIGIT_SIDE_PX, DIGIT_SIDE_PX), interpolation=cv2.INTER_LINEAR)
        images.append((big, str(int(target))))
    return images


@pytest.fixture
def digits_folder(tmp_path: Path, digit_images: list[tuple[np.ndarray, str]]) -> Path:
    """tmp_path/digits/<label>/<index>.png, one PNG per digit."""
    root = tmp_path / "digits"
    for index, (image, label) in enumerate(digit_images):
        (root / label).mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / label / f"{index:03d}.png"), image)
    return root


def _expected_folder_frames(folder: Path) -> list[tuple[bytes, str]]:
    """(file bytes, label) in the order the camera sends them: sorted by relative path."""
    files = sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).as_posix())
    return [(path.read_bytes(), path.parent.name) for path in files]


def _write_video(path: Path, frames: int) -> None:
    """An MJPG .avi of real photo content: scikit-image's camera, shifted a bit per frame."""
    photo = cv2.imread(str(SKIMAGE_DATA / "camera.png"), cv2.IMREAD_COLOR)
    assert photo is not None
    small = cv2.resize(photo, VIDEO_SIZE_PX, interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, VIDEO_SIZE_PX)
    assert writer.isOpened()
    try:
        for index in range(frames):
            writer.write(np.roll(small, index * 7, axis=1))
    finally:
        writer.release()


# --- broker helpers --------------------------------------------------------------------


@pytest.fixture
def fedge_cli() -> click.Group:
    """The `fedge` group with the camera command, as a user gets it."""
    if "camera" not in cli.commands:
        cli.add_command(camera_command)
    return cli


@pytest.fixture
def watcher(mosquitto: MosquittoProcess, topics: Topics) -> Iterator[_Watcher]:
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    subscribe(client, topics.all_camera_frames())
    try:
        yield _Watcher(client, collector, topics)
    finally:
        disconnect(client)


class _Watcher:
    """A subscriber to every camera topic of the test's fleet."""

    def __init__(self, client: mqtt.Client, collector: MessageCollector, topics: Topics) -> None:
        self.client = client
        self.collector = collector
        self.topics = topics

    def frames(self, camera: str, count: int) -> list[Received]:
        """Wait for ``count`` frames of ``camera``, then make sure no more are in flight."""
        topic = self.topics.camera_frames(camera)
        self.collector.wait_for_topic(topic, count)
        # A marker published after the frames arrived comes back after any stray extra.
        marker = self.topics.camera_frames("marker")
        publish(self.client, marker, b"\xff\xd8\xff marker", qos=1)
        self.collector.wait_for_topic(marker)
        return self.collector.on_topic(topic)


def _camera_args(mosquitto: MosquittoProcess, topics: Topics, camera: str) -> list[str]:
    return [
        "--broker",
        mosquitto.url,
        "--root",
        topics.root,
        "--fleet",
        topics.fleet,
        "--camera",
        camera,
        "--fps",
        FAST_FPS,
    ]


def _run(fedge_cli: click.Group, args: list[str]) -> Result:
    result = CliRunner().invoke(fedge_cli, ["camera", *args])
    assert "Traceback" not in result.output
    return result


# --- folders ---------------------------------------------------------------------------


def test_folder_with_envelopes_and_folder_labels(
    fedge_cli: click.Group,
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: _Watcher,
    digits_folder: Path,
) -> None:
    expected = _expected_folder_frames(digits_folder)
    args = [str(digits_folder), "--envelope", "--labels-from-folders"]
    result = _run(fedge_cli, [*args, *_camera_args(mosquitto, topics, "desk")])
    assert result.exit_code == 0, result.output
    assert f"sent {DIGIT_COUNT} frames" in result.stderr

    received = watcher.frames("desk", DIGIT_COUNT)
    assert len(received) == DIGIT_COUNT
    for seq, (message, (image, label)) in enumerate(zip(received, expected, strict=True)):
        frame = decode_frame(message.payload)
        assert frame.shape is PayloadShape.ENVELOPE
        assert frame.image == image
        assert frame.meta.label == label
        assert frame.meta.frame_id == f"desk-{seq}"
        assert frame.meta.timestamp is not None


def test_publish_frames_without_the_cli(
    mosquitto: MosquittoProcess, topics: Topics, watcher: _Watcher, digits_folder: Path
) -> None:
    expected = _expected_folder_frames(digits_folder)[:5]
    link = MqttLink(parse_broker_url(mosquitto.url), client_id="camera-api", clean_session=True)
    link.start()
    progress: list[CameraReport] = []
    frames = open_source(str(digits_folder), labels_from_folders=True, loop=True)
    try:
        link.wait_connected(10.0)
        settings = PublishSettings(fps=0, count=5, envelope=True, camera_id="api", qos=1)
        report = publish_frames(
            link,
            frames,
            topic=topics.camera_frames("api"),
            settings=settings,
            on_progress=progress.append,
        )
    finally:
        frames.close()
        link.stop()

    assert (report.frames_sent, report.frames_confirmed, report.frames_unconfirmed) == (5, 5, 0)
    assert report.bytes_sent > sum(len(image) for image, _ in expected)
    assert [p.frames_sent for p in progress] == [1, 2, 3, 4, 5]
    received = watcher.frames("api", 5)
    assert len(received) == 5
    decoded = [decode_frame(message.payload) for message in received]
    assert [(f.image, f.meta.label) for f in decoded] == expected
    assert [f.meta.frame_id for f in decoded] == [f"api-{seq}" for seq in range(5)]


def test_bare_frames_are_the_files_byte_for_byte(
    fedge_cli: click.Group,
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: _Watcher,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SKIMAGE_DATA / "coins.png", folder / "b-coins.PNG")
    shutil.copy(SKIMAGE_DATA / "moon.png", folder / "a-moon.png")
    photo = cv2.imread(str(SKIMAGE_DATA / "camera.png"), cv2.IMREAD_GRAYSCALE)
    assert photo is not None
    assert cv2.imwrite(str(folder / "c-camera.JPG"), photo)
    (folder / "notes.txt").write_text("not a frame", encoding="utf-8")
    (folder / ".hidden.png").write_bytes((SKIMAGE_DATA / "moon.png").read_bytes())
    expected = [
        (folder / name).read_bytes() for name in ("a-moon.png", "b-coins.PNG", "c-camera.JPG")
    ]

    result = _run(fedge_cli, [str(folder), *_camera_args(mosquitto, topics, "bare")])
    assert result.exit_code == 0, result.output

    received = watcher.frames("bare", len(expected))
    assert [message.payload for message in received] == expected


def test_resize_sends_jpeg_of_the_asked_size(
    fedge_cli: click.Group,
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: _Watcher,
    digits_folder: Path,
) -> None:
    args = [str(digits_folder / "0"), "--resize", "32x24", "--count", "1"]
    result = _run(fedge_cli, [*args, *_camera_args(mosquitto, topics, "small")])
    assert result.exit_code == 0, result.output

    (message,) = watcher.frames("small", 1)
    assert payload_shape(message.payload) is PayloadShape.JPEG
    image = cv2.imdecode(np.frombuffer(message.payload, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    assert image.shape == (24, 32, 3)


# --- video -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"), [([], VIDEO_FRAMES), (["--loop", "--count", "9"], 9)]
)
def test_video_file_frames_go_out_as_jpeg(
    fedge_cli: click.Group,
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: _Watcher,
    tmp_path: Path,
    extra: list[str],
    expected: int,
) -> None:
    video = tmp_path / "clip.avi"
    _write_video(video, VIDEO_FRAMES)
    args = [str(video), "--envelope", "--label", "street", *extra]
    result = _run(fedge_cli, [*args, *_camera_args(mosquitto, topics, "video")])
    assert result.exit_code == 0, result.output

    received = watcher.frames("video", expected)
    assert len(received) == expected
    for message in received:
        frame = decode_frame(message.payload)
        assert frame.meta.label == "street"
        assert payload_shape(frame.image) is PayloadShape.JPEG
        image = cv2.imdecode(np.frombuffer(frame.image, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        assert image.shape == (VIDEO_SIZE_PX[1], VIDEO_SIZE_PX[0], 3)
    # --loop starts the clip over: frame 6 is frame 0 again (same pixels, same encoder).
    if expected > VIDEO_FRAMES:
        images = [decode_frame(message.payload).image for message in received]
        assert images[VIDEO_FRAMES] == images[0]
        assert images[1] != images[0]


# --- mistakes --------------------------------------------------------------------------


def _assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0]
    assert isinstance(result.exception, SystemExit)


def test_missing_source_is_a_one_line_error(
    fedge_cli: click.Group,
    mosquitto: MosquittoProcess,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _run(fedge_cli, ["no-such-folder", "--broker", mosquitto.url])
    _assert_one_line_error(result, "no-such-folder", "does not exist")


def test_empty_folder_is_a_one_line_error(
    fedge_cli: click.Group,
    mosquitto: MosquittoProcess,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here", encoding="utf-8")
    result = _run(fedge_cli, ["empty", "--broker", mosquitto.url])
    _assert_one_line_error(result, "no images", "empty")


def test_wildcard_topic_is_refused(
    fedge_cli: click.Group, mosquitto: MosquittoProcess, digits_folder: Path
) -> None:
    result = _run(fedge_cli, [str(digits_folder), "--topic", "cams/+/frames"])
    _assert_one_line_error(result, "concrete topic")


@pytest.mark.parametrize("size", ["64", "0x10", "axb", "64x64x3"])
def test_bad_resize_is_a_usage_error(
    fedge_cli: click.Group, digits_folder: Path, size: str
) -> None:
    result = _run(fedge_cli, [str(digits_folder), "--resize", size])
    assert result.exit_code == 2
    assert "--resize" in result.stderr


def test_help_shows_examples(fedge_cli: click.Group) -> None:
    result = _run(fedge_cli, ["--help"])
    assert result.exit_code == 0
    for example in (
        "fedge camera ./digits --fps 10 --envelope",
        "fedge camera /dev/video0 --camera door",
        "fedge camera clip.mp4 --loop",
    ):
        assert example in result.output
