"""The ``keras`` recipe through a real Mosquitto: a user's own ``.keras`` model.

- The example CNN (three Conv2D, two MaxPool, Flatten, Dense 64, Dense 10) at 64x64x3 trains
  on ``fedge agent run`` processes that cannot import TensorFlow, through the trainable
  ``.tflite`` the coordinator exports, next to an agent that trains it in Keras; each agent's
  update equals the one Keras makes from the same weights, data and batches (to 1e-5).
- A model LiteRT cannot train (a trainable BatchNormalization) is refused for the LiteRT-only
  agents, with the reason in the coordinator's status, and trained by the agent that has
  TensorFlow.

Data: scikit-learn's digits rendered as 64x64 colour frames (:func:`colour_digits`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.store import SampleStore
from agent.training import KerasTrainer, TrainConfig
from agent.training.keras_trainer import load_keras_model
from agent.transfer_task import sample_input
from coordinator.rounds import RoundPlan
from coordinator.transfer_workload import colour_digits
from fedge.harness.federation import federation
from protocol.messages.agent import AgentStatus, InferenceResult
from protocol.messages.codec import decode_message
from protocol.messages.rounds import CoordinatorStatus, ModelRelease, RoundConfig, UpdateEncoding
from protocol.preprocess import PreprocessSpec
from protocol.topics import Topics
from protocol.updates import decode_update, decode_weights
from tests.brokers import MessageCollector, MosquittoProcess, disconnect, mqtt_client, subscribe

pytestmark = [pytest.mark.broker, pytest.mark.system]

LABELS = tuple(str(d) for d in range(10))
PER_AGENT = 40
BATCH = 16
LEARNING_RATE = 0.05
ATOL = 1e-5
STATUS_TIMEOUT_S = 120.0
_SPEC = PreprocessSpec(height=64, width=64)


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def example_cnn(*, batch_norm: bool = False) -> Any:
    """The yardstick CNN; with ``batch_norm``, a trainable BatchNormalization after conv 1."""
    keras = _keras()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    norm = [layers.BatchNormalization()] if batch_norm else []
    return keras.Sequential(
        [
            keras.Input((64, 64, 3)),
            layers.Conv2D(32, 3, activation="relu"),
            *norm,
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(len(LABELS), activation="softmax"),
        ],
        name="example_cnn",
    )


def write_keras_task(directory: Path, model: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Keras 3's saver calls np.array(variable, copy=False), which numpy 2 deprecates.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        model.save(directory / "model.keras")
    labels = ", ".join(f'"{label}"' for label in LABELS)
    task = directory / "task.toml"
    task.write_text(
        f'name = "cnn64"\nlabels = [{labels}]\n\n[recipe]\nkind = "keras"\n'
        f'model = "model.keras"\n\n[preprocess]\nheight = 64\nwidth = 64\n\n'
        f"[training]\nbatch_size = {BATCH}\nlearning_rate = {LEARNING_RATE}\n",
        encoding="utf-8",
    )
    return task


def write_shares(directory: Path, agents: int) -> list[Path]:
    """``PER_AGENT`` colour digits per agent, as ``<label>/<index>.png`` folders."""
    import cv2

    images, labels = colour_digits()
    shares = []
    for agent in range(agents):
        folder = directory / f"agent-{agent:02d}"
        for index in range(agent * PER_AGENT, (agent + 1) * PER_AGENT):
            path = folder / LABELS[labels[index]] / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(images[index], cv2.COLOR_RGB2BGR))
        shares.append(folder)
    return shares


def agent_dataset(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """An agent's samples as its federated client reads them: sorted by id, preprocessed."""
    store = SampleStore(data_dir / "samples")
    try:
        index = {label: i for i, label in enumerate(LABELS)}
        x, y = [], []
        for sample in sorted(store.samples(), key=lambda s: s.sample_id):
            image = sample_input(store, sample, _SPEC)
            assert image is not None
            x.append(image)
            y.append(index[sample.label])
    finally:
        store.close()
    return np.stack(x).astype(np.float32), np.asarray(y, np.int32)


def _plan(min_agents: int) -> RoundPlan:
    return RoundPlan(
        rounds=1,
        min_agents=min_agents,
        deadline_s=240.0,
        config=RoundConfig(
            epochs=1, learning_rate=LEARNING_RATE, update_encoding=UpdateEncoding.FLOAT32
        ),
    )


def test_the_example_cnn_trains_on_agents_without_tensorflow_as_keras_would(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    task = write_keras_task(tmp_path / "task", example_cnn())
    shares = write_shares(tmp_path / "shares", 3)
    with federation(
        tmp_path,
        mosquitto,
        topics,
        num_agents=3,
        shares=shares,
        tensorflow_agents={"agent-02"},
        per_agent={"agent-02": {"trainer": "keras"}},
    ) as fed:
        coordinator = fed.start_coordinator(task=task)
        fed.wait_for_agents(3)
        # Their birth messages: TensorFlow cannot be imported on the first two, LiteRT is all
        # they have; the third trains with Keras (from the release's .keras file), in the
        # same round.
        trainers = {a.agent: a.trainers for a in coordinator.fleet.agents().values()}
        assert trainers == {
            "agent-00": ("litert",),
            "agent-01": ("litert",),
            "agent-02": ("keras",),
        }
        [outcome] = coordinator.run_plan_now(_plan(3))
        assert outcome.ok, outcome.reason
        assert outcome.metrics["updates"] == 3
        first = ModelRelease.model_validate_json(coordinator.state.release_json("r0") or "")
        assert first.recipe == "keras"
        assert first.trainers == ("litert", "keras")
        assert first.litert_refusal is None
        start = decode_weights(coordinator.state.blob(first.weights.sha256))
        round_seed = coordinator.state.round(1).config["seed"]  # type: ignore[union-attr]
        for agent in fed.agents:
            assert "Traceback" not in agent.log()
            update = decode_update((agent.data_dir / "federated/updates/1.update").read_bytes())
            keras_trainer = KerasTrainer(
                lambda: load_keras_model((task.parent / "model.keras").read_bytes())
            )
            keras_trainer.set_weights(start)
            x, y = agent_dataset(agent.data_dir)
            keras_trainer.train(
                x,
                y,
                TrainConfig(
                    epochs=1, batch_size=BATCH, learning_rate=LEARNING_RATE, seed=round_seed
                ),
            )
            keras_deltas = [
                after - before
                for after, before in zip(keras_trainer.get_weights(), start, strict=True)
            ]
            assert any(np.abs(d).max() > 1e-3 for d in update)
            for got, want in zip(update, keras_deltas, strict=True):
                np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def _check_served(
    mosquitto: MosquittoProcess, topics: Topics, agents: list[str], version: str
) -> None:
    """A frame on the camera topic: each agent answers with ``version`` and the task's labels."""
    import cv2

    def served(messages: list[Any]) -> list[InferenceResult]:
        results = [
            decode_message(m.payload, InferenceResult)
            for m in messages
            if m.topic.endswith("/results")
        ]
        return [r for r in results if r.model_version == version]

    images, _ = colour_digits()
    ok, frame = cv2.imencode(".png", cv2.cvtColor(images[-1], cv2.COLOR_RGB2BGR))
    assert ok

    def swapped(messages: list[Any]) -> bool:
        versions = {}
        for message in messages:
            if message.topic.endswith("/status") and message.payload:
                status = decode_message(message.payload, AgentStatus)
                if status.capabilities is not None:
                    versions[status.agent] = status.capabilities.model_version
        return all(versions.get(agent) == version for agent in agents)

    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    try:
        for agent in agents:
            subscribe(client, topics.agent_status(agent))
            subscribe(client, topics.agent_results(agent))
        # The status an agent publishes when it swaps a release in (retained: the latest).
        collector.wait_for(swapped, STATUS_TIMEOUT_S)
        client.publish(topics.camera_frames("door"), frame.tobytes(), qos=1).wait_for_publish(10)
        messages = collector.wait_for(
            lambda msgs: len({r.agent for r in served(msgs)}) >= len(agents), STATUS_TIMEOUT_S
        )
    finally:
        disconnect(client)
    for result in served(messages):
        assert result.predictions[0].label in LABELS


def _status_with_left_out(collector: MessageCollector) -> CoordinatorStatus:
    def found(messages: list[Any]) -> bool:
        return any(s.left_out for s in statuses(messages))

    def statuses(messages: list[Any]) -> list[CoordinatorStatus]:
        return [decode_message(m.payload, CoordinatorStatus) for m in messages if m.payload]

    messages = collector.wait_for(found, STATUS_TIMEOUT_S)
    return next(s for s in statuses(messages) if s.left_out)


def test_a_model_litert_cannot_train_is_refused_for_litert_agents_and_trained_by_keras(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    task = write_keras_task(tmp_path / "task", example_cnn(batch_norm=True))
    shares = write_shares(tmp_path / "shares", 3)
    collector = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=collector)
    subscribe(watcher, topics.coordinator_status())
    try:
        with federation(
            tmp_path,
            mosquitto,
            topics,
            num_agents=3,
            shares=shares,
            trainer="auto",
            tensorflow_agents={"agent-02"},
        ) as fed:
            coordinator = fed.start_coordinator(task=task, status_interval_s=1.0)
            fed.wait_for_agents(3)
            trainers = {a.agent: a.trainers for a in coordinator.fleet.agents().values()}
            assert trainers == {
                "agent-00": ("litert",),
                "agent-01": ("litert",),
                "agent-02": ("litert", "keras"),
            }
            [outcome] = coordinator.run_plan_now(_plan(1))
            assert outcome.ok, outcome.reason
            assert outcome.metrics["updates"] == 1
            record = coordinator.state.round(1)
            assert record is not None
            assert record.selected == ("agent-02",)
            release = ModelRelease.model_validate_json(coordinator.state.release_json("r0") or "")
            assert release.trainers == ("keras",)
            assert release.litert_refusal is not None
            assert "batch statistics" in release.litert_refusal
            status = _status_with_left_out(collector)
            assert set(status.left_out) == {"agent-00", "agent-01"}
            for why in status.left_out.values():
                assert "trains with litert only" in why
                assert "BatchNormalization" in why
            kept = [(a.data_dir / "federated/updates/1.update").is_file() for a in fed.agents]
            assert kept == [False, False, True]
            # Every agent serves the Keras-trained release through its float32 variant.
            latest = coordinator.runner.current_release()
            assert [v.name for v in latest.variants] == ["float32"]
            _check_served(mosquitto, topics, [a.agent_id for a in fed.agents], latest.version)
            for agent in fed.agents:
                assert "Traceback" not in agent.log()
    finally:
        disconnect(watcher)
