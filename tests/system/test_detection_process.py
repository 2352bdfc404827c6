"""Detectors served by `fedge agent run`, photos sent with `mosquitto_pub -f`, objects checked."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from protocol.messages.agent import CommandAck, InferenceResult
from protocol.messages.codec import encode_message
from protocol.messages.commands import LoadModel, SetOptions
from protocol.preprocess import DetectionFormat, DetectionSpec
from protocol.topics import Topics
from tests.agent.agent_helpers import (
    RESULT_TIMEOUT_S,
    agent_run_process,
    agent_settings,
    decoded,
    events_with_reason,
    write_agent_toml,
)
from tests.agent.detection_checks import assert_objects_match, expected_objects, raw_ssd_objects
from tests.agent.detectors import SSD_LABELS, YOLO_LABELS, DetectorFiles
from tests.agent.test_detection import COFFEE, ROCKET
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    publish,
    subscribe,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]


@dataclass
class Served:
    collector: MessageCollector
    broker: MosquittoProcess
    topics: Topics
    client: mqtt.Client
    photos: Path
    sent: int = 0

    def publish_photo(self, name: str, photo: bytes) -> None:
        """Publish the photo the way a user would: a file, with mosquitto_pub."""
        path = self.photos / f"{name}.jpg"
        path.write_bytes(photo)
        mosquitto_pub = shutil.which("mosquitto_pub")
        assert mosquitto_pub, "mosquitto_pub comes with Mosquitto (apt package mosquitto-clients)"
        broker = ["-h", self.broker.host, "-p", str(self.broker.port)]
        topic = self.topics.camera_frames("door")
        subprocess.run(
            [mosquitto_pub, *broker, "-t", topic, "-f", str(path)], check=True, timeout=30
        )

    def send_photo(self, name: str, photo: bytes) -> InferenceResult:
        """Publish the photo and wait for its result."""
        self.publish_photo(name, photo)
        self.sent += 1
        messages = self.collector.wait_for_topic(
            self.topics.agent_results("pi-1"), self.sent, RESULT_TIMEOUT_S
        )
        result = decoded(messages)[-1]
        assert isinstance(result, InferenceResult)
        return result

    def command(self, command: LoadModel | SetOptions) -> CommandAck:
        publish(self.client, self.topics.agent_commands("pi-1"), encode_message(command))

        def answered(_messages: list[Received]) -> bool:
            return any(a.command_id == command.command_id for a in self._acks())

        self.collector.wait_for(answered, RESULT_TIMEOUT_S)
        (ack,) = [a for a in self._acks() if a.command_id == command.command_id]
        return ack

    def _acks(self) -> list[CommandAck]:
        events = decoded(self.collector.on_topic(self.topics.agent_events("pi-1")))
        return [e for e in events if isinstance(e, CommandAck)]


@pytest.fixture
def served_ssd(
    mosquitto: MosquittoProcess, topics: Topics, ssd_detector: DetectorFiles, tmp_path: Path
) -> Iterator[Served]:
    collector = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=collector)
    subscribe(watcher, f"{topics.root}/#")
    config = tmp_path / "agent.toml"
    settings = agent_settings(
        mosquitto,
        topics,
        tmp_path / "data",
        None,
        model_path=ssd_detector.model,
        labels_path=ssd_detector.labels,
        preprocess_path=ssd_detector.preprocess,
        model_version="ssd-1",
        # load_model reads only under its models directories: every detector of the session
        models_dirs=[str(tmp_path.parent)],
    )
    write_agent_toml(config, settings)
    photos = tmp_path / "photos"
    photos.mkdir()
    try:
        with agent_run_process(config, collector, topics):
            yield Served(collector, mosquitto, topics, watcher, photos)
    finally:
        disconnect(watcher)


def test_ssd_then_yolo_objects_from_mosquitto_pub_match_independent_decoding(
    served_ssd: Served,
    ssd_detector: DetectorFiles,
    yolo_detector: DetectorFiles,
) -> None:
    result = served_ssd.send_photo("coffee", COFFEE)
    assert result.model_version == "ssd-1"
    assert result.objects
    assert_objects_match(result.objects, raw_ssd_objects(ssd_detector, COFFEE, SSD_LABELS))
    assert_objects_match(result.objects, expected_objects(ssd_detector, COFFEE, SSD_LABELS))

    # Hot swap to the YOLO model; its preprocess.json (letterbox, NMS limits) comes along.
    ack = served_ssd.command(
        LoadModel(
            command_id="yolo",
            path=str(yolo_detector.model),
            labels_path=str(yolo_detector.labels),
            version="yolo-1",
        )
    )
    assert ack.ok, ack
    result = served_ssd.send_photo("rocket", ROCKET)
    assert result.model_version == "yolo-1"
    assert result.objects
    assert_objects_match(result.objects, expected_objects(yolo_detector, ROCKET, YOLO_LABELS))

    # Live limits: fewer objects, the same best ones.
    ack = served_ssd.command(SetOptions(command_id="limits", max_objects=2))
    assert ack.ok
    assert ack.detail["max_objects"] == 2
    limited = served_ssd.send_photo("rocket-again", ROCKET)
    assert limited.objects == result.objects[:2]


def test_bad_detector_outputs_give_error_events_and_the_agent_carries_on(
    served_ssd: Served,
    ssd_detector: DetectorFiles,
    broken_detectors: dict[str, DetectorFiles],
    tmp_path: Path,
) -> None:
    events = served_ssd.topics.agent_events("pi-1")
    for n, (fault, files) in enumerate(sorted(broken_detectors.items()), start=1):
        ack = served_ssd.command(LoadModel(command_id=fault, path=str(files.model)))
        assert ack.ok, ack
        served_ssd.publish_photo(fault, COFFEE)

        def refused(_messages: list[Received], count: int = n) -> bool:
            return len(events_with_reason(served_ssd.collector, events, "bad_output")) >= count

        served_ssd.collector.wait_for(refused, RESULT_TIMEOUT_S)
    messages = [e.message for e in events_with_reason(served_ssd.collector, events, "bad_output")]
    assert any("NaN" in m for m in messages)
    assert any("count" in m for m in messages)

    # A spec that names a layout the model does not have: the load is refused with a reason.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(ssd_detector.model, wrong / "ssd.tflite")
    spec = ssd_detector.spec.model_copy(
        update={"detection": DetectionSpec(format=DetectionFormat.YOLO)}
    )
    (wrong / "preprocess.json").write_text(spec.model_dump_json(exclude_none=True))
    ack = served_ssd.command(LoadModel(command_id="wrong", path=str(wrong / "ssd.tflite")))
    assert not ack.ok
    assert ack.reason == "spec_mismatch"

    # The agent is still serving: back to the real SSD, and results flow again.
    ack = served_ssd.command(
        LoadModel(
            command_id="back", path=str(ssd_detector.model), labels_path=str(ssd_detector.labels)
        )
    )
    assert ack.ok, ack
    assert served_ssd.send_photo("coffee-again", COFFEE).objects
