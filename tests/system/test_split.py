"""Split learning through a real Mosquitto with a LiteRT-only agent process (no TensorFlow)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.reference import build_reference_cnn, load_digits_split
from coordinator.split import SplitCoordinator
from coordinator.split_model import UpperPart, export_lower_tflite
from coordinator.split_ushape import UShapedCoordinator, export_top_tflite
from fedge.harness.federation import no_tensorflow_path
from protocol.split import BatchId, SplitReceiver, cut_bytes
from protocol.topics import TopicKind, Topics
from runtime.address import parse_broker_url
from runtime.mqtt import MqttLink
from tests.brokers import MessageCollector, Received, disconnect, mqtt_client, subscribe

BATCH, CUT, LR, STEPS = 16, 3, 0.05, 2
TOP = 4  # U-shaped: the last Dense layer stays on the agent with the labels
CUT_SIZE = 256
EVENT_TIMEOUT_S = 60.0
FRAMING_LIMIT_BYTES = 1024  # manifest, chunk header and safetensors header per frame


def _agent(
    tmp_path: Path,
    broker: str,
    topics: Topics,
    model: bytes,
    x: Any,
    y: Any,
    *,
    top: bytes | None = None,
    agent_id: str = "pi-1",
    federate: bool = False,
) -> subprocess.Popen[bytes]:
    (tmp_path / "lower.tflite").write_bytes(model)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(no_tensorflow_path(tmp_path / "site")), os.getcwd()])
    command = [
        sys.executable, "-m", "agent.split", "--broker", broker, "--root", topics.root,
        "--fleet", topics.fleet, "--agent", agent_id, "--model", str(tmp_path / "lower.tflite"),
        "--data", str(tmp_path / "data.npz"), "--lr", str(LR), "--outbox",
        str(tmp_path / "outbox.db"), "--out", str(tmp_path / "weights.npz"),
    ]  # fmt: skip
    if federate:  # SplitFed's averaging of the agents' parts at the end of the round
        command.append("--federate")
    if top is not None:  # U-shaped: the agent keeps the last layers, and its labels
        (tmp_path / "top.tflite").write_bytes(top)
        command += ["--top", str(tmp_path / "top.tflite")]
    with (tmp_path / "agent.log").open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _coordinator(
    mosquitto: Any,
    topics: Topics,
    upper: UpperPart,
    kind: type[SplitCoordinator] = SplitCoordinator,
    **extra: Any,
) -> tuple[MqttLink, SplitCoordinator]:
    holder: dict[str, SplitCoordinator] = {}

    def deliver(topic: str, payload: bytes) -> None:
        holder["c"].on_message(topic, payload)

    link = MqttLink(
        parse_broker_url(mosquitto.url), client_id=f"{topics.root}-coord", on_message=deliver
    )
    holder["c"] = kind(link, topics, upper, **extra)
    for topic_filter in holder["c"].subscriptions():
        link.subscribe(topic_filter)
    link.start()
    link.wait_connected(10)
    holder["c"].start()
    return link, holder["c"]


def _replay_last_batch(mosquitto: Any, topics: Topics, coordinator: SplitCoordinator) -> None:
    """Publish the last batch's upload again, as an outbox resend would; wait for its gradient."""
    first = BatchId(1, "pi-1", STEPS - 1)
    again = [(t, p) for t, p in coordinator.traffic.uploads if topics.parse(t).step == first.step]
    replies: queue.Queue[str] = queue.Queue()

    def deliver(topic: str, _payload: bytes) -> None:
        replies.put(topic)

    link = MqttLink(
        parse_broker_url(mosquitto.url), client_id=f"{topics.root}-replay", on_message=deliver
    )
    link.subscribe(topics.agent_split_downloads("pi-1"))
    link.start()
    try:
        link.wait_connected(10)
        for topic, payload in again:
            link.publish(topic, payload)
        manifest = topics.split_manifest(1, "pi-1", first.step, "down")
        while replies.get(timeout=EVENT_TIMEOUT_S) != manifest:
            pass
    finally:
        link.stop()


def _batches() -> tuple[Any, Any]:
    split = load_digits_split()
    x = split.x_train[: BATCH * STEPS].astype(np.float32).reshape(STEPS, BATCH, 8, 8, 1)
    y = split.y_train[: BATCH * STEPS].astype(np.float32).reshape(STEPS, BATCH)
    return x, y


def _unsplit_sgd(model: Any, x: Any, y: Any) -> tuple[list[Any], list[float]]:
    """The unsplit Keras model's weights and losses after the same SGD steps on the batches."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    losses = []
    for step in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[step], model(x[step], training=True))
        for variable, grad in zip(
            model.trainable_variables, tape.gradient(loss, model.trainable_variables), strict=True
        ):
            variable.assign_sub(LR * grad)
        losses.append(float(loss))
    return [np.asarray(w) for w in model.get_weights()], losses


def _event(coordinator: SplitCoordinator, kind: str) -> BatchId:
    while True:
        got, batch = coordinator.events.get(timeout=EVENT_TIMEOUT_S)
        if got == kind:
            return batch


def test_split_training_equals_the_unsplit_model_through_the_broker(
    tmp_path: Path, mosquitto: Any, topics: Topics
) -> None:
    model = build_reference_cnn()
    upper = UpperPart(model, CUT, learning_rate=LR)
    x, y = _batches()
    link, coordinator = _coordinator(mosquitto, topics, upper)
    agent = _agent(
        tmp_path, mosquitto.url, topics, export_lower_tflite(model, CUT, batch_size=BATCH), x, y
    )
    try:
        assert agent.wait(timeout=120) == 0, (tmp_path / "agent.log").read_text()
        for _ in range(STEPS):
            _event(coordinator, "committed")
        after, up_bytes = upper.weights(), dict(coordinator.traffic.up)
        _replay_last_batch(mosquitto, topics, coordinator)
        assert coordinator.applied == STEPS  # the duplicate batch was answered, not applied
        for have, want in zip(upper.weights(), after, strict=True):
            np.testing.assert_array_equal(have, want)
    finally:
        coordinator.stop()
        link.stop()
        if agent.poll() is None:
            agent.kill()
    expected, losses = _unsplit_sgd(model, x, y)
    for step, loss in enumerate(losses):
        assert coordinator.traffic.losses[BatchId(1, "pi-1", step)] == pytest.approx(loss, abs=1e-5)
    with np.load(tmp_path / "weights.npz") as lower:
        got = [lower["w0"], lower["w1"], *upper.weights()]
    for have, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5)
    for step in range(STEPS):
        batch = BatchId(1, "pi-1", step)
        # Up: activations plus the labels (float32, BATCH * 4 bytes); down: the gradient only.
        assert 0 < up_bytes[batch] - cut_bytes(BATCH, CUT_SIZE) - BATCH * 4 < FRAMING_LIMIT_BYTES
        assert (
            0 < coordinator.traffic.down[batch] - cut_bytes(BATCH, CUT_SIZE) < FRAMING_LIMIT_BYTES
        )


def test_an_agent_killed_mid_batch_leaves_the_upper_part_as_before(
    tmp_path: Path, mosquitto: Any, topics: Topics
) -> None:
    model = build_reference_cnn()
    upper = UpperPart(model, CUT, learning_rate=LR)
    before = upper.weights()
    x, y = _batches()
    killed: queue.Queue[int] = queue.Queue()
    agent_box: dict[str, subprocess.Popen[bytes]] = {}

    def kill_before_the_gradient_goes(_batch: BatchId) -> None:
        agent_box["p"].kill()
        killed.put(agent_box["p"].wait(timeout=30))

    link, coordinator = _coordinator(
        mosquitto, topics, upper, stage_timeout_s=1.0, on_staged=kill_before_the_gradient_goes
    )
    agent_box["p"] = _agent(
        tmp_path, mosquitto.url, topics, export_lower_tflite(model, CUT, batch_size=BATCH), x, y
    )
    try:
        assert killed.get(timeout=120) != 0
        assert _event(coordinator, "aborted") == BatchId(1, "pi-1", 0)
    finally:
        coordinator.stop()
        link.stop()
    for have, want in zip(upper.weights(), before, strict=True):
        np.testing.assert_array_equal(have, want)


def _frames(messages: list[Received], topics: Topics) -> dict[tuple[BatchId, str], set[str]]:
    """Every split frame that crossed the broker, reassembled: its tensors' names."""
    receiver, frames = SplitReceiver(), {}
    for message in messages:
        parsed = topics.parse(message.topic)
        if parsed.kind is TopicKind.SPLIT_DONE or parsed.direction is None:
            continue
        assert parsed.round is not None
        assert parsed.agent is not None
        assert parsed.step is not None
        batch = BatchId(parsed.round, parsed.agent, parsed.step)
        if parsed.kind is TopicKind.SPLIT_MANIFEST:
            done = receiver.add_manifest(batch, parsed.direction, message.payload)
        else:
            done = receiver.add_chunk(batch, parsed.direction, message.payload)
        if done is not None:
            frames[(done[0], done[1])] = set(done[2])
    return frames


def test_a_u_shaped_split_keeps_the_labels_on_the_agent_and_equals_the_unsplit_model(
    tmp_path: Path, mosquitto: Any, topics: Topics
) -> None:
    model = build_reference_cnn()
    middle = UpperPart(model, CUT, learning_rate=LR, end=TOP)
    x, y = _batches()
    seen = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=seen)
    every_split_topic = (
        topics.all_split_uploads(), topics.all_split_backs(), topics.all_split_done(),
        topics.agent_split_downloads("pi-1"), topics.agent_split_middles("pi-1"),
    )  # fmt: skip
    for topic_filter in every_split_topic:
        subscribe(watcher, topic_filter)
    link, coordinator = _coordinator(mosquitto, topics, middle, UShapedCoordinator)
    lower = export_lower_tflite(model, CUT, batch_size=BATCH)
    top = export_top_tflite(model, TOP, batch_size=BATCH)
    agent = _agent(tmp_path, mosquitto.url, topics, lower, x, y, top=top)
    try:
        assert agent.wait(timeout=120) == 0, (tmp_path / "agent.log").read_text()
        for _ in range(STEPS):
            _event(coordinator, "committed")
        done = [topics.split_done(1, "pi-1", step) for step in range(STEPS)]
        seen.wait_for(lambda m: all(any(r.topic == t for r in m) for t in done), EVENT_TIMEOUT_S)
    finally:
        disconnect(watcher)
        coordinator.stop()
        link.stop()
        if agent.poll() is None:
            agent.kill()
    # Every payload on the broker: no frame carries labels, and no payload holds their bytes.
    frames = _frames(seen.messages, topics)
    assert {direction for _batch, direction in frames} == {"up", "mid", "back", "down"}
    assert len(frames) == 4 * STEPS
    assert set().union(*frames.values()) == {"activations", "grad"}
    for step in range(STEPS):
        for labels in (y[step], y[step].astype(np.int32), y[step].astype(np.int64)):
            assert not any(labels.tobytes() in m.payload for m in seen.messages)
    expected, losses = _unsplit_sgd(model, x, y)
    with np.load(tmp_path / "weights.npz") as kept:
        got = [kept["w0"], kept["w1"], *middle.weights(), kept["t0"], kept["t1"]]
        np.testing.assert_allclose(kept["losses"], losses, atol=1e-5)
    for have, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5)
