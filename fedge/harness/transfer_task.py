"""The transfer workload's reference figures, shared by its system test and bench/transfer.py.

:func:`agents_data` reads each agent's sample store after a run and splits it exactly as the
agent does (training part, federated-evaluation hold-out); :func:`central_head` trains the
same head centrally on the union of the training parts, the figure federated evaluation is
measured against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.evaluation import held_out
from agent.head import HeadTrainer
from agent.preprocess import decode_image, prepare_input
from agent.store import SampleStore
from agent.training import TrainConfig
from agent.transfer_task import Backbone
from coordinator.task_producers import head_initial_weights
from fedge.harness.clients import MessageCollector, Received, disconnect, mqtt_client, subscribe
from protocol.messages.agent import InferenceResult
from protocol.messages.codec import decode_message
from protocol.preprocess import PreprocessSpec
from protocol.topics import Topics

__all__ = ["AgentData", "agents_data", "central_head", "folder_images", "served_results"]

_RESULT_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class AgentData:
    train_x: np.ndarray
    train_y: np.ndarray
    held_x: np.ndarray
    held_y: np.ndarray


def agents_data(
    data_dirs: Sequence[Path],
    backbone: Backbone,
    *,
    labels: Sequence[str],
    spec: PreprocessSpec,
    eval_fraction: float,
) -> list[AgentData]:
    """Each agent's embeddings, split as the agent splits them."""
    parts = []
    for data_dir in data_dirs:
        store = SampleStore(data_dir / "samples")
        try:
            samples = sorted(
                (s for s in store.samples() if s.label in labels), key=lambda s: s.sample_id
            )
            images = [prepare_input(decode_image(store.load_image(s)), spec) for s in samples]
        finally:
            store.close()
        x = backbone.embed(np.stack(images))
        y = np.asarray([list(labels).index(s.label) for s in samples], np.int32)
        held = held_out([s.sample_id for s in samples], eval_fraction)
        parts.append(AgentData(x[~held], y[~held], x[held], y[held]))
    return parts


def central_head(
    parts: Sequence[AgentData], *, classes: int, epochs: int, learning_rate: float
) -> list[HeadTrainer]:
    """The head trained centrally on the union of the training parts: one per epoch."""
    x = np.concatenate([p.train_x for p in parts])
    y = np.concatenate([p.train_y for p in parts])
    head = HeadTrainer(head_initial_weights(x.shape[1], (), classes, seed=0))
    heads = []
    for epoch in range(epochs):
        head.train(x, y, TrainConfig(batch_size=16, learning_rate=learning_rate, seed=epoch))
        heads.append(HeadTrainer(head.get_weights()))
    return heads


def folder_images(
    folder: Path, labels: Sequence[str], spec: PreprocessSpec
) -> tuple[np.ndarray, np.ndarray]:
    """A ``DIR/<label>/<image>`` folder as model inputs and label indexes."""
    x, y = [], []
    for index, label in enumerate(labels):
        for path in sorted((folder / label).glob("*")):
            x.append(prepare_input(decode_image(path.read_bytes()), spec))
            y.append(index)
    return np.stack(x), np.asarray(y, np.int32)


def served_results(
    broker: Any, topics: Topics, agents: Sequence[str], frame: bytes, *, version: str
) -> dict[str, InferenceResult]:
    """One frame to the camera topic; each agent's result from the model ``version``."""
    collector = MessageCollector()
    client = mqtt_client(broker, collector=collector)

    def served(messages: list[Received]) -> dict[str, InferenceResult]:
        results = [decode_message(m.payload, InferenceResult) for m in messages]
        return {r.agent: r for r in results if r.model_version == version}

    try:
        for agent in agents:
            subscribe(client, topics.agent_results(agent))
        client.publish(topics.camera_frames("door"), frame, qos=1).wait_for_publish(10)
        messages = collector.wait_for(lambda m: len(served(m)) >= len(agents), _RESULT_TIMEOUT_S)
    finally:
        disconnect(client)
    return served(messages)
