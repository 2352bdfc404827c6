"""The agent as a user runs it: `fedge agent run`, fed by `fedge camera` and `mosquitto_pub`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.tflite_export import ReferenceModels
from protocol.messages.agent import AgentStatus, InferenceResult
from protocol.messages.codec import decode_message
from protocol.topics import Topics
from tests.agent.agent_helpers import (
    RESULT_TIMEOUT_S,
    agent_run_process,
    agent_settings,
    decoded,
    held_out_digits,
    write_agent_toml,
)
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    subscribe,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]

DIGITS = 40


@pytest.fixture
def agent_process(
    mosquitto: MosquittoProcess,
    topics: Topics,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> Iterator[MessageCollector]:
    collector = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=collector)
    subscribe(watcher, f"{topics.root}/#")
    config = tmp_path / "agent.toml"
    write_agent_toml(config, agent_settings(mosquitto, topics, tmp_path / "data", reference_models))
    try:
        with agent_run_process(config, collector, topics):
            yield collector
    finally:
        disconnect(watcher)


def test_fedge_camera_folder_gives_correct_results(
    agent_process: MessageCollector,
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
) -> None:
    images, truth = held_out_digits(DIGITS)
    folder = tmp_path / "frames"
    folder.mkdir()
    for n, image in enumerate(images):
        (folder / f"{n:03d}.png").write_bytes(image)
    # One frame per camera would need many processes; instead the camera paces frames so
    # that each is processed before the next arrives (latest-frame-wins would drop others).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "camera",
            str(folder),
            "--envelope",
            "--fps",
            "10",
            "--broker",
            mosquitto.url,
            "--root",
            topics.root,
            "--fleet",
            topics.fleet,
            "--camera",
            "desk",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    messages = agent_process.wait_for_topic(topics.agent_results("pi-1"), DIGITS, RESULT_TIMEOUT_S)
    results = [r for r in decoded(messages) if isinstance(r, InferenceResult)]
    by_frame = {r.frame_id: r for r in results}
    predicted = [
        int(by_frame[f"desk-{n}"].predictions[0].label)
        for n in range(DIGITS)
        if f"desk-{n}" in by_frame
    ]
    assert len(predicted) == DIGITS
    assert np.mean(np.array(predicted) == np.array(truth)) >= 0.9


def test_mosquitto_pub_file_gives_a_result(
    agent_process: MessageCollector,
    mosquitto: MosquittoProcess,
    mosquitto_pub: Path,
    topics: Topics,
    tmp_path: Path,
) -> None:
    images, truth = held_out_digits(1)
    photo = tmp_path / "some.png"
    photo.write_bytes(images[0])
    subprocess.run(
        [
            mosquitto_pub,
            "-h",
            mosquitto.host,
            "-p",
            str(mosquitto.port),
            "-t",
            topics.camera_frames("door"),
            "-f",
            str(photo),
        ],
        check=True,
        timeout=30,
    )
    (message,) = agent_process.wait_for_topic(topics.agent_results("pi-1"), 1, RESULT_TIMEOUT_S)
    (result,) = decoded([message])
    assert result.source == "door"
    assert result.predictions[0].label == str(truth[0])


def test_sigterm_publishes_a_graceful_offline_status(
    mosquitto: MosquittoProcess,
    topics: Topics,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    write_agent_toml(config, agent_settings(mosquitto, topics, tmp_path / "data", reference_models))
    collector = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=collector)
    subscribe(watcher, topics.agent_status("pi-1"))
    process = subprocess.Popen(
        [sys.executable, "-m", "fedge", "agent", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def state_is(state: str) -> Callable[[list[Received]], bool]:
            def check(messages: list[Received]) -> bool:
                statuses = [decode_message(m.payload, AgentStatus) for m in messages]
                return bool(statuses) and statuses[-1].state == state

            return check

        collector.wait_for(state_is("online"), RESULT_TIMEOUT_S)
        process.terminate()
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output.decode(errors="replace")
        collector.wait_for(state_is("offline"), RESULT_TIMEOUT_S)
        last = decode_message(collector.messages[-1].payload, AgentStatus)
        assert last.timestamp > 0  # the agent said goodbye itself; the LWT carries 0
    finally:
        if process.poll() is None:
            process.kill()
        disconnect(watcher)
