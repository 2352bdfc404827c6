"""A transfer release's one serving ``.tflite``, through a real Mosquitto.

Two ``fedge agent run`` processes that cannot import TensorFlow train a transfer head for two
rounds; the release carries a float32 model composed of backbone, pooling and head (one
invoke) and its int8 quantisation. The float model's outputs equal the backbone then the head
to float tolerance, the agents hot-swap it in, and their results on a camera frame are its
outputs under the task's labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.head import HeadTrainer
from agent.preprocess import decode_image, prepare_input
from agent.runtime import TfliteModel
from agent.transfer_task import Backbone
from coordinator.rounds import RoundPlan
from coordinator.transfer_workload import TASK_LABELS, TransferWorkload, write_transfer_workload
from fedge.harness.federation import federation
from fedge.harness.transfer_task import folder_images
from protocol.messages.agent import InferenceResult
from protocol.messages.codec import decode_message
from protocol.messages.rounds import ModelRelease, RoundConfig
from protocol.topics import Topics
from protocol.updates import decode_weights
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
# Dynamic-range int8 (the coordinator has no images to calibrate with) against float32.
INT8_AGREEMENT = 0.95
RESULT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> TransferWorkload:
    return write_transfer_workload(tmp_path_factory.mktemp("serving"), AGENTS, epochs=5)


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
        assert len(int8_model) < len(float_model)
        head = HeadTrainer(decode_weights(coordinator.state.blob(release.weights.sha256)))

        x, _ = folder_images(workload.test, TASK_LABELS, release.preprocess)
        separate = head.predict(Backbone(workload.backbone.read_bytes()).embed(x))
        one = _outputs(float_model, x)
        np.testing.assert_allclose(one, separate, atol=FLOAT_TOLERANCE)
        int8 = _outputs(int8_model, x)
        assert np.mean(int8.argmax(1) == one.argmax(1)) >= INT8_AGREEMENT

        _check_served(mosquitto, topics, workload, release, float_model)
        for agent in fed.agents:
            # The agent fetched the float32 model (it serves it; the int8 one it never asked for).
            assert (
                agent.data_dir / "federated" / "blobs" / release.variants[0].blob.sha256
            ).is_file()
            assert not (
                agent.data_dir / "federated" / "blobs" / release.variants[1].blob.sha256
            ).exists()
            assert "Traceback" not in agent.log()


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
