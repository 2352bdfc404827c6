"""A transfer task through a real Mosquitto: agents without TensorFlow train a head.

The workload (:mod:`coordinator.transfer_workload`): scikit-learn's digits rendered as 64x64
colour frames; a backbone pretrained on the digits 0-4 only; the task is 5-9, split non-IID
over four ``fedge agent run`` processes that cannot import TensorFlow.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import pytest

from agent.head import HeadTrainer
from agent.preprocess import decode_image, prepare_input
from agent.training import TrainConfig
from agent.transfer_task import Backbone
from coordinator.rounds import RoundPlan
from coordinator.transfer_workload import TASK_LABELS, TransferWorkload, write_transfer_workload
from fedge.harness.federation import federation
from fedge.harness.transfer_task import agents_data, central_head
from protocol.errors import FedgeError
from protocol.messages.agent import AgentStatus, InferenceResult
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
ROUNDS = 11  # the eleventh round's updates evaluate round 10's model
EVAL_FRACTION = 0.2
FEDERATED_GAP = 0.02  # the acceptance: within 2 points of the central head
EPOCHS = 10
LEARNING_RATE = 0.1
RESULT_TIMEOUT_S = 60.0
PERSONAL_EPOCHS = 20
PERSONAL_ROUNDS = 3
_SPEC = PreprocessSpec(height=64, width=64)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> TransferWorkload:
    return write_transfer_workload(tmp_path_factory.mktemp("transfer"), AGENTS)


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
                    eval_fraction=EVAL_FRACTION,
                ),
            )
        )
        assert [o.ok for o in outcomes] == [True] * ROUNDS, [o.reason for o in outcomes]
        assert all(o.metrics["updates"] == AGENTS for o in outcomes)
        release = coordinator.runner.current_release()
        assert release.recipe == "transfer"
        head_bytes = release.weights.size_bytes
        assert head_bytes < 4 * (64 * 5 + 5) + 1024  # only the head travels

        # Round 11's updates evaluate the model of round 10 on the agents' held-out splits.
        federated = outcomes[-1].metrics
        assert federated["federated_model"] == f"r{ROUNDS - 1}"
        assert federated["federated_agents"] == AGENTS
        parts = agents_data(
            [agent.data_dir for agent in fed.agents],
            Backbone(workload.backbone.read_bytes()),
            labels=TASK_LABELS,
            spec=_SPEC,
            eval_fraction=EVAL_FRACTION,
        )
        held_x = np.concatenate([p.held_x for p in parts])
        held_y = np.concatenate([p.held_y for p in parts])
        assert federated["federated_examples"] == len(held_y)
        assert federated["federated_class_counts"] == np.bincount(held_y, minlength=5).tolist()
        evaluated_json = coordinator.state.release_json(f"r{ROUNDS - 1}")
        assert evaluated_json is not None
        evaluated = ModelRelease.model_validate_json(evaluated_json)
        global_head = HeadTrainer(decode_weights(coordinator.state.blob(evaluated.weights.sha256)))
        assert federated["federated_accuracy"] == pytest.approx(
            global_head.evaluate(held_x, held_y)[1]
        )
        heads = central_head(
            parts,
            classes=len(TASK_LABELS),
            epochs=(ROUNDS - 1) * EPOCHS,
            learning_rate=LEARNING_RATE,
        )
        _, central = heads[-1].evaluate(held_x, held_y)
        # Measured here (in-process replay of these rounds, five round/head seeds): with the
        # head's standardised steps federated 0.91-0.925 against central 0.91-0.917 on the
        # same 133 held-out examples; with plain SGD it was 0.72-0.865 against 0.88-0.895.
        assert federated["federated_accuracy"] >= central - FEDERATED_GAP, (federated, central)
        assert central > 0.85

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


def test_personalised_agents_serve_their_own_head_and_report_both_accuracies(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, workload: TransferWorkload
) -> None:
    """FedPer-style: three agents fine-tune the release's head on their own samples and serve
    it; the fourth, left at the default, serves the release's head and reports nothing."""
    personal = {f"agent-{i:02d}": {"personalise_epochs": PERSONAL_EPOCHS} for i in range(3)}
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    try:
        subscribe(client, topics.all_agent_statuses())
        for index in range(AGENTS):
            subscribe(client, topics.agent_results(f"agent-{index:02d}"))
        with federation(
            tmp_path,
            mosquitto,
            topics,
            num_agents=AGENTS,
            shares=workload.shares,
            per_agent=personal,
            top_k=5,
        ) as fed:
            coordinator = fed.start_coordinator(task=workload.task)
            fed.wait_for_agents(AGENTS)
            outcomes = coordinator.run_plan_now(
                RoundPlan(
                    rounds=PERSONAL_ROUNDS,
                    min_agents=AGENTS,
                    deadline_s=120.0,
                    config=RoundConfig(epochs=EPOCHS, learning_rate=LEARNING_RATE, min_samples=4),
                )
            )
            assert [o.ok for o in outcomes] == [True] * PERSONAL_ROUNDS
            release = coordinator.runner.current_release()
            statuses = _statuses_of(collector, topics, release.version, personal)
            global_head = HeadTrainer(
                decode_weights(coordinator.state.blob(release.weights.sha256))
            )
            backbone = Backbone(workload.backbone.read_bytes())
            parts = agents_data(
                [agent.data_dir for agent in fed.agents],
                backbone,
                labels=TASK_LABELS,
                spec=_SPEC,
                eval_fraction=0.2,
            )
            frame = next(workload.test.glob("seven/*.png")).read_bytes()
            features = backbone.embed(prepare_input(decode_image(frame), _SPEC)[np.newaxis])
            expected = {}
            for index, part in enumerate(parts):
                agent = f"agent-{index:02d}"
                if agent not in personal:
                    assert statuses[agent].personalisation is None
                    expected[agent] = global_head.predict(features)[0]
                    continue
                report = statuses[agent].personalisation
                assert report is not None
                assert report.model_version == release.version
                assert report.serving == "personal"
                assert (report.held_out, report.trained_on) == (len(part.held_y), len(part.train_y))
                assert report.global_accuracy == pytest.approx(
                    global_head.evaluate(part.held_x, part.held_y)[1]
                )
                mine = HeadTrainer(global_head.get_weights())
                mine.train(
                    part.train_x,
                    part.train_y,
                    TrainConfig(epochs=PERSONAL_EPOCHS, batch_size=16, learning_rate=0.1),
                )
                assert report.personal_accuracy == pytest.approx(
                    mine.evaluate(part.held_x, part.held_y)[1]
                )
                expected[agent] = mine.predict(features)[0]
            collector.clear()
            client.publish(topics.camera_frames("door"), frame, qos=1).wait_for_publish(10)
            messages = collector.wait_for(
                lambda msgs: len(_served(msgs, release.version)) >= AGENTS, RESULT_TIMEOUT_S
            )
            results = {r.agent: r for r in _served(messages, release.version)}
            assert set(results) == set(expected)
            for agent, result in results.items():
                for prediction in result.predictions:
                    assert prediction.score == pytest.approx(
                        expected[agent][prediction.index], abs=1e-5
                    )
            for process in fed.agents:
                assert "Traceback" not in process.log()
    finally:
        disconnect(client)


def _statuses_of(
    collector: MessageCollector, topics: Topics, version: str, personal: Collection[str]
) -> dict[str, AgentStatus]:
    """Each agent's newest status once it serves ``version`` (personalised ones: its head)."""

    status_topics = {topics.agent_status(f"agent-{index:02d}") for index in range(AGENTS)}

    def newest(messages: list[Received]) -> dict[str, AgentStatus]:
        found = {}
        for message in messages:
            if message.topic not in status_topics:
                continue
            try:
                status = decode_message(message.payload, AgentStatus)
            except FedgeError:
                continue
            found[status.agent] = status
        return found

    def ready(messages: list[Received]) -> bool:
        found = newest(messages)
        for index in range(AGENTS):
            status = found.get(f"agent-{index:02d}")
            if status is None or status.capabilities is None:
                return False
            if status.capabilities.model_version != version:
                return False
            report = status.personalisation
            if status.agent in personal and (report is None or report.model_version != version):
                return False
        return True

    return newest(collector.wait_for(ready, RESULT_TIMEOUT_S))
