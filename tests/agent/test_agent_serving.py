"""The agent through a real Mosquitto: frames in, results out, bad input refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from agent.model import load_serving_model
from agent.preprocess import decode_image, prepare_input
from coordinator.tflite_export import ReferenceModels
from protocol.frames import FrameMeta, encode_envelope
from protocol.messages.agent import CommandAck, ErrorEvent, InferenceResult
from protocol.messages.codec import encode_message
from protocol.messages.commands import LabelFrame, LoadModel, Ping, SetOptions
from protocol.topics import Topics
from tests.agent.agent_helpers import (
    RESULT_TIMEOUT_S,
    agent_settings,
    decoded,
    held_out_digits,
    running_agent,
    to_png,
    wait_for_reason,
)
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    disconnect,
    mqtt_client,
    publish,
    subscribe,
)

Watcher = tuple[Any, MessageCollector]

pytestmark = pytest.mark.broker

DIGITS = 60
COFFEE = skimage_data.coffee()  # type: ignore[no-untyped-call]
CAMERAMAN = skimage_data.camera()  # type: ignore[no-untyped-call]


@pytest.fixture
def watcher(mosquitto: MosquittoProcess, topics: Topics) -> Iterator[Watcher]:
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    subscribe(client, f"{topics.root}/#")
    yield client, collector
    disconnect(client)


def _bare_predictions(model_path: Path, models: ReferenceModels, images: list[bytes]) -> list[int]:
    serving = load_serving_model(
        model_path, version="bare", labels_path=models.labels, preprocess_path=models.preprocess
    )
    return [
        int(np.argmax(serving.model.predict(prepare_input(decode_image(i), serving.spec))[0][0]))
        for i in images
    ]


@pytest.mark.parametrize("variant", ["digits_float32", "digits_int8"])
def test_results_match_the_bare_interpreter_exactly(
    variant: str,
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: Watcher,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    client, collector = watcher
    images, truth = held_out_digits(DIGITS)
    model_path = getattr(reference_models, variant)
    settings = agent_settings(mosquitto, topics, tmp_path, reference_models, model_path=model_path)
    results_topic = topics.agent_results("pi-1")
    with running_agent(**settings):
        for n, image in enumerate(images):
            # One camera per frame: latest-frame-wins never drops any of them.
            publish(client, topics.camera_frames(f"cam{n}"), image)
        messages = collector.wait_for_topic(results_topic, DIGITS, RESULT_TIMEOUT_S)
    results = {r.source: r for r in decoded(messages)}
    agent_predictions = [int(results[f"cam{n}"].predictions[0].label) for n in range(DIGITS)]
    assert agent_predictions == _bare_predictions(model_path, reference_models, images)
    accuracy = np.mean(np.array(agent_predictions) == np.array(truth))
    assert accuracy >= 0.9
    sample = results["cam0"]
    assert isinstance(sample, InferenceResult)
    assert sample.model_version == "digits-v1"
    assert sample.timings.total_ms >= sample.timings.invoke_ms


def test_envelopes_carry_frame_ids_and_labels_into_the_store(
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: Watcher,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    client, collector = watcher
    images, truth = held_out_digits(3)
    settings = agent_settings(mosquitto, topics, tmp_path, reference_models)
    with running_agent(**settings) as agent:
        for n, (image, label) in enumerate(zip(images, truth, strict=True)):
            meta = FrameMeta(frame_id=f"f-{n}", timestamp=1.0, label=str(label))
            publish(client, topics.camera_frames(f"cam{n}"), encode_envelope(image, meta))
        messages = collector.wait_for_topic(topics.agent_results("pi-1"), 3, RESULT_TIMEOUT_S)
        assert sorted(r.frame_id for r in decoded(messages)) == ["f-0", "f-1", "f-2"]
        assert all(r.timings.since_capture_ms is not None for r in decoded(messages))
        assert sum(agent.store.counts().values()) == 3


def test_two_output_non_square_model_gives_raw_outputs(
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: Watcher,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    client, collector = watcher
    settings = agent_settings(
        mosquitto, topics, tmp_path, None, model_path=reference_models.two_output
    )
    photo = cv2.imencode(".jpg", cv2.cvtColor(COFFEE, cv2.COLOR_RGB2BGR))[1]
    with running_agent(**settings):
        publish(client, topics.camera_frames("cam"), photo.tobytes())
        (message,) = collector.wait_for_topic(topics.agent_results("pi-1"), 1, RESULT_TIMEOUT_S)
    (result,) = decoded([message])
    assert result.predictions == ()
    assert len(result.outputs) == 2
    assert all(output.values for output in result.outputs)


def test_bad_input_gives_error_events_and_the_agent_keeps_serving(
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: Watcher,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    client, collector = watcher
    images, _ = held_out_digits(1)
    events = topics.agent_events("pi-1")
    corrupt_jpeg = bytearray(cv2.imencode(".jpg", CAMERAMAN)[1].tobytes())
    corrupt_jpeg[20:400] = b"\x00" * 380  # magic intact, headers and tables destroyed
    bad_frames = {
        "undecodable": bytes(corrupt_jpeg),
        "empty": b"",
        "too_large": b"\xff\xd8\xff" + bytes(20 * 1024 * 1024),
        "bad_envelope": b"FDGF\x01\x00\x00\x00\x05{nope" + images[0],
        "unknown_format": b"hello, not an image",
    }
    settings = agent_settings(mosquitto, topics, tmp_path, reference_models)
    with running_agent(**settings):
        for reason, payload in bad_frames.items():
            publish(client, topics.camera_frames(f"bad-{reason}"), payload)
            wait_for_reason(collector, events, reason)
        # Alpha and grey PNGs are not errors: they are decoded to BGR and served.
        digit = cv2.imdecode(np.frombuffer(images[0], np.uint8), cv2.IMREAD_GRAYSCALE)
        assert digit is not None
        with_alpha = cv2.cvtColor(digit, cv2.COLOR_GRAY2BGRA)
        publish(client, topics.camera_frames("alpha"), to_png(with_alpha))
        publish(client, topics.camera_frames("grey"), to_png(digit))
        publish(client, topics.camera_frames("good"), images[0])
        messages = collector.wait_for_topic(topics.agent_results("pi-1"), 3, RESULT_TIMEOUT_S)
    labels = {r.source: r.predictions[0].label for r in decoded(messages)}
    assert labels["alpha"] == labels["grey"] == labels["good"]
    for event in decoded(collector.on_topic(events)):
        assert isinstance(event, ErrorEvent)
        assert event.message


def test_commands_are_acknowledged_or_refused_with_a_reason(
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: Watcher,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    client, collector = watcher
    images, truth = held_out_digits(1)
    commands, events = topics.agent_commands("pi-1"), topics.agent_events("pi-1")
    settings = agent_settings(mosquitto, topics, tmp_path, reference_models)

    def ack_for(command_id: str) -> CommandAck:
        def found(_messages: object) -> bool:
            return any(
                isinstance(e, CommandAck) and e.command_id == command_id
                for e in decoded(collector.on_topic(events))
            )

        collector.wait_for(found, RESULT_TIMEOUT_S)
        return next(
            e
            for e in decoded(collector.on_topic(events))
            if isinstance(e, CommandAck) and e.command_id == command_id
        )

    with running_agent(**settings) as agent:
        publish(client, commands, encode_message(Ping(command_id="p1")))
        assert ack_for("p1").ok
        publish(client, commands, encode_message(SetOptions(command_id="o1", top_k=1, max_fps=50)))
        assert ack_for("o1").ok
        assert agent.options.top_k == 1
        publish(
            client,
            commands,
            encode_message(LabelFrame(command_id="l1", frame_id="nope", label="3")),
        )
        refused = ack_for("l1")
        assert not refused.ok
        assert refused.reason == "unknown_frame"
        # A real frame, then label it by the id the agent gave it.
        publish(client, topics.camera_frames("cam"), images[0])
        (message,) = collector.wait_for_topic(topics.agent_results("pi-1"), 1, RESULT_TIMEOUT_S)
        (result,) = decoded([message])
        assert len(result.predictions) == 1
        publish(
            client,
            commands,
            encode_message(
                LabelFrame(command_id="l2", frame_id=result.frame_id, label=str(truth[0]))
            ),
        )
        assert ack_for("l2").ok
        assert agent.store.counts() == {str(truth[0]): 1}
        publish(
            client,
            commands,
            encode_message(
                LoadModel(
                    command_id="m1",
                    path=str(reference_models.digits_int8),
                    labels_path=str(reference_models.labels),
                    version="digits-int8",
                )
            ),
        )
        assert ack_for("m1").ok
        assert agent.serving is not None
        assert agent.serving.version == "digits-int8"
        publish(
            client,
            commands,
            encode_message(LoadModel(command_id="m2", path=str(tmp_path / "missing.tflite"))),
        )
        assert not ack_for("m2").ok
        assert agent.serving.version == "digits-int8"  # a failed load keeps the old model
        for payload, reason in [
            (b"{not json", "invalid"),
            (b'{"kind": "reboot", "command_id": "x"}', "invalid"),
            (b'{"kind": "start_rounds", "command_id": "x"}', "unexpected_kind"),
        ]:
            publish(client, commands, payload)
            wait_for_reason(collector, events, reason)
