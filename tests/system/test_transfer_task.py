"""A transfer task through a real Mosquitto: agents without TensorFlow train a head.

The workload (:mod:`coordinator.transfer_workload`): scikit-learn's digits rendered as 64x64
colour frames; a backbone pretrained on the digits 0-4 only; the task is 5-9, split non-IID
over four ``fedge agent run`` processes that cannot import TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.head import HeadTrainer
from agent.preprocess import decode_image, prepare_input
from agent.training import TrainConfig
from agent.transfer_task import Backbone
from coordinator.rounds import RoundPlan
from coordinator.task_producers import head_initial_weights
from coordinator.transfer_workload import TASK_LABELS, TransferWorkload, write_transfer_workload
from fedge.harness.federation import federation
from protocol.messages.agent import InferenceResult
from protocol.messages.codec import decode_message
from protocol.messages.rounds import ModelRelease, RoundConfig, UpdateEncoding
from protocol.preprocess import PreprocessSpec
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

AGENTS = 4
ROUNDS = 10
EPOCHS = 10
LEARNING_RATE = 0.05
RESULT_TIMEOUT_S = 60.0
_SPEC = PreprocessSpec(height=64, width=64)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> TransferWorkload:
    return write_transfer_workload(tmp_path_factory.mktemp("transfer"), AGENTS)


def _images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = [], []
    for index, label in enumerate(TASK_LABELS):
        for path in sorted((folder / label).glob("*.png")):
            x.append(prepare_input(decode_image(path.read_bytes()), _SPEC))
            y.append(index)
    return np.stack(x), np.asarray(y, np.int32)


def _central_head(workload: TransferWorkload, backbone: Backbone) -> HeadTrainer:
    """The same head trained on the union of the agents' data, as many epochs in all."""
    parts = [_images(share) for share in workload.shares if any(share.iterdir())]
    x = backbone.embed(np.concatenate([p[0] for p in parts]))
    y = np.concatenate([p[1] for p in parts])
    head = HeadTrainer(head_initial_weights(backbone.feature_size, (), len(TASK_LABELS), seed=0))
    for epoch in range(ROUNDS * EPOCHS):
        head.train(x, y, TrainConfig(batch_size=16, learning_rate=LEARNING_RATE, seed=epoch))
    return head


def test_agents_without_tensorflow_train_a_transfer_head_and_serve_it(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, workload: TransferWorkload
) -> None:
    with federation(tmp_path, mosquitto, topics, num_agents=AGENTS, shares=workload.shares) as fed:
        coordinator = fed.start_coordinator(task=workload.task)
        fed.wait_for_agents(AGENTS)
        outcomes = coordinator.run_plan_now(
            RoundPlan(
                rounds=ROUNDS,
                min_agents=AGENTS,
                deadline_s=120.0,
                config=RoundConfig(
                    epochs=EPOCHS,
                    learning_rate=LEARNING_RATE,
                    update_encoding=UpdateEncoding.FLOAT32,
                    min_samples=4,
                ),
            )
        )
        assert [o.ok for o in outcomes] == [True] * ROUNDS, [o.reason for o in outcomes]
        assert all(o.metrics["updates"] == AGENTS for o in outcomes)
        release = coordinator.runner.current_release()
        assert release.recipe == "transfer"
        head_bytes = release.weights.size_bytes
        assert head_bytes < 4 * (64 * 5 + 5) + 1024  # only the head travels

        backbone = Backbone(workload.backbone.read_bytes())
        federated = HeadTrainer(decode_weights(coordinator.state.blob(release.weights.sha256)))
        test_x, test_y = _images(workload.test)
        test_features = backbone.embed(test_x)
        _, fed_accuracy = federated.evaluate(test_features, test_y)
        _, central_accuracy = _central_head(workload, backbone).evaluate(test_features, test_y)
        assert fed_accuracy >= central_accuracy - 0.02, (fed_accuracy, central_accuracy)
        assert central_accuracy > 0.8

        _check_served_results(mosquitto, topics, workload, release)
        for agent in fed.agents:
            assert "Traceback" not in agent.log()


def _served(messages: list[Received], version: str) -> list[InferenceResult]:
    results = [decode_message(m.payload, InferenceResult) for m in messages]
    return [r for r in results if r.model_version == version]


def _check_served_results(
    mosquitto: MosquittoProcess, topics: Topics, workload: TransferWorkload, release: ModelRelease
) -> None:
    """A frame to the camera topic: every agent answers with the task's labels."""
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    try:
        for index in range(AGENTS):
            subscribe(client, topics.agent_results(f"agent-{index:02d}"))
        frame = next(workload.test.glob("seven/*.png")).read_bytes()
        client.publish(topics.camera_frames("door"), frame, qos=1).wait_for_publish(10)
        messages = collector.wait_for(
            lambda msgs: len(_served(msgs, release.version)) >= AGENTS, RESULT_TIMEOUT_S
        )
    finally:
        disconnect(client)
    for result in _served(messages, release.version):
        assert result.predictions[0].label in TASK_LABELS
        assert len(result.predictions) >= 1
