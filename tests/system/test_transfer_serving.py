"""A transfer release's one serving ``.tflite``, through a real Mosquitto.

Two ``fedge agent run`` processes that cannot import TensorFlow train a transfer head for two
rounds; the release carries a float32 model composed of backbone, pooling and head (one
invoke) and its int8 quantisation. The float model's outputs equal the backbone then the head
to float tolerance, the agents hot-swap it in, and their results on a camera frame are its
outputs under the task's labels. Each agent composes that model itself from the backbone it
holds and the round's head, and serves it once its sha256 is the one the release names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agent.head import HeadTrainer
from agent.preprocess import decode_image, prepare_input
from agent.runtime import TfliteModel
from agent.transfer_task import Backbone
from coordinator.rounds import RoundPlan
from coordinator.transfer_workload import TASK_LABELS, TransferWorkload, write_transfer_workload
from coordinator.variants import quantize_int8
from fedge.cli import cli
from fedge.harness.federation import federation
from fedge.harness.transfer_task import folder_images
from protocol.messages.agent import CommandAck, InferenceResult
from protocol.messages.base import Message
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.commands import RequestStatus
from protocol.messages.rounds import ModelRelease, RoundConfig
from protocol.topics import Topics
from protocol.updates import decode_weights
from runtime.merging import without_record
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    subscribe,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]

AGENTS = 2
ROUNDS = 2
FLOAT_TOLERANCE = 1e-5
# Dynamic-range int8 (the coordinator has no images to calibrate with). This backbone is
# int8-unfriendly: top-1 agreement with float32 measured 0.65-0.95 across pretrainings (the
# TensorFlow converter's own int8 backbone does no better), so only far above chance (0.2).
INT8_AGREEMENT = 0.5
INT8_SIZE_RATIO = 0.35
RESULT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> TransferWorkload:
    return write_transfer_workload(tmp_path_factory.mktemp("serving"), AGENTS)


def test_agents_serve_the_release_s_one_tflite_with_the_task_s_labels(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, workload: TransferWorkload
) -> None:
    with federation(
        tmp_path, mosquitto, topics, num_agents=AGENTS, shares=workload.shares, top_k=5
    ) as fed:
        coordinator = fed.start_coordinator(task=workload.task)
        fed.wait_for_agents(AGENTS)
        outcomes = coordinator.run_plan_now(
            RoundPlan(
                rounds=ROUNDS,
                min_agents=AGENTS,
                deadline_s=120.0,
                config=RoundConfig(epochs=5, learning_rate=0.05, min_samples=4),
            )
        )
        assert [o.ok for o in outcomes] == [True] * ROUNDS, [o.reason for o in outcomes]
        release = coordinator.runner.current_release()
        assert [v.name for v in release.variants] == ["float32", "int8"]
        float_model = coordinator.state.blob(release.variants[0].blob.sha256)
        int8_model = coordinator.state.blob(release.variants[1].blob.sha256)
        assert len(int8_model) <= INT8_SIZE_RATIO * len(float_model)
        # The int8 variant is the quantisation of that one model, nothing else.
        assert int8_model == without_record(quantize_int8(float_model).tflite)
        head = HeadTrainer(decode_weights(coordinator.state.blob(release.weights.sha256)))

        x, _ = folder_images(workload.test, TASK_LABELS, release.preprocess)
        separate = head.predict(Backbone(workload.backbone.read_bytes()).embed(x))
        one = _outputs(float_model, x)
        np.testing.assert_allclose(one, separate, atol=FLOAT_TOLERANCE)
        int8 = _outputs(int8_model, x)
        assert np.mean(int8.argmax(1) == one.argmax(1)) >= INT8_AGREEMENT

        _check_served(mosquitto, topics, workload, release, float_model)
        # `fedge model export` takes the served file off the broker, byte for byte.
        exported = tmp_path / "served.tflite"
        assert fed.key_paths is not None
        credentials = [
            arg
            for flag, value in (
                ("--username", mosquitto.username),
                ("--password", mosquitto.password),
            )
            if value
            for arg in (flag, value)
        ]
        result = CliRunner().invoke(
            cli,
            [
                "model",
                "export",
                release.version,
                "--out",
                str(exported),
                "--broker",
                mosquitto.url,
                "--fleet",
                topics.fleet,
                "--root",
                topics.root,
                "--coordinator-key",
                str(fed.key_paths[1]),
                *credentials,
            ],
        )
        assert result.exit_code == 0, result.output
        assert exported.read_bytes() == float_model
        missing = CliRunner().invoke(
            cli,
            [
                "model",
                "export",
                release.version,
                "--variant",
                "pruned",
                "--out",
                str(tmp_path / "none.tflite"),
                "--broker",
                mosquitto.url,
                "--fleet",
                topics.fleet,
                "--root",
                topics.root,
                *credentials,
            ],
        )
        assert missing.exit_code == 2
        assert "has no variant 'pruned' (its variants: float32, int8)" in missing.output

        served = _served_sha256(mosquitto, topics)
        assert served == {a.agent_id: release.variants[0].blob.sha256 for a in fed.agents}
        for agent in fed.agents:
            # Composed on the agent from the backbone it holds and the round's head, and
            # served because it hashes as the signed release says: neither variant was
            # downloaded, so no release costs the agents the backbone's bytes again.
            blobs = agent.data_dir / "federated" / "blobs"
            assert (blobs / release.trainable.sha256).is_file()
            assert not any((blobs / v.blob.sha256).exists() for v in release.variants)
            assert "Traceback" not in agent.log()


def _served_sha256(mosquitto: MosquittoProcess, topics: Topics) -> dict[str, str]:
    """Every agent's answer to a status command: the sha256 of the .tflite it serves."""
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    ids = [f"agent-{index:02d}" for index in range(AGENTS)]
    try:
        for agent_id in ids:
            subscribe(client, topics.agent_events(agent_id))
        for agent_id in ids:
            command = encode_message(RequestStatus(command_id=f"which-{agent_id}"))
            client.publish(topics.agent_commands(agent_id), command, qos=1).wait_for_publish(10)

        def acks(messages: list[Received]) -> list[CommandAck]:
            decoded: list[Message] = [decode_message(m.payload) for m in messages]
            return [a for a in decoded if isinstance(a, CommandAck) and a.command == "status"]

        answered = collector.wait_for(lambda m: len(acks(m)) >= AGENTS, RESULT_TIMEOUT_S)
    finally:
        disconnect(client)
    return {
        a.command_id.removeprefix("which-"): str(a.detail["model_sha256"]) for a in acks(answered)
    }


def _outputs(tflite: bytes, x: np.ndarray) -> np.ndarray:
    model = TfliteModel.from_bytes(tflite)
    assert model.runtime.name == "litert"
    return np.concatenate([model.predict(sample)[0] for sample in x])


def _check_served(
    mosquitto: MosquittoProcess,
    topics: Topics,
    workload: TransferWorkload,
    release: ModelRelease,
    float_model: bytes,
) -> None:
    """A frame to the camera topic: each agent answers with the one model's scores."""
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)

    def served(messages: list[Received]) -> list[InferenceResult]:
        results = [decode_message(m.payload, InferenceResult) for m in messages]
        return [r for r in results if r.model_version == release.version]

    try:
        for index in range(AGENTS):
            subscribe(client, topics.agent_results(f"agent-{index:02d}"))
        frame = next(workload.test.glob("seven/*.png")).read_bytes()
        client.publish(topics.camera_frames("door"), frame, qos=1).wait_for_publish(10)
        messages = collector.wait_for(lambda m: len(served(m)) >= AGENTS, RESULT_TIMEOUT_S)
    finally:
        disconnect(client)
    image = prepare_input(decode_image(frame), release.preprocess)
    expected = _outputs(float_model, image[np.newaxis])[0]
    for result in served(messages):
        assert {p.label for p in result.predictions} == set(TASK_LABELS)
        for prediction in result.predictions:
            assert prediction.label == TASK_LABELS[prediction.index]
            assert prediction.score == pytest.approx(expected[prediction.index], abs=1e-6)
