"""SplitFed's averaging through a real Mosquitto: two LiteRT-only agents, one average.

Two agent processes (no TensorFlow) train their own lower parts on different data against
the coordinator's shared upper part, one with twice the batches of the other; at the end of
the round each sends its part, the coordinator averages them weighted by batches trained and
sends the average back, and each agent's part then holds exactly that average.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.reference import build_reference_cnn, load_digits_split
from coordinator.split import SplitCoordinator
from coordinator.split_average import PartAverager
from coordinator.split_model import UpperPart, export_lower_tflite
from protocol.topics import Topics
from runtime.address import parse_broker_url
from runtime.mqtt import MqttLink
from tests.system.test_split import BATCH, CUT, LR, _agent

pytestmark = [pytest.mark.broker, pytest.mark.system]

AGENT_BATCHES = {"pi-1": 2, "pi-2": 1}
AVERAGE_TIMEOUT_S = 120.0


def _data() -> dict[str, tuple[Any, Any]]:
    split = load_digits_split()
    data, start = {}, 0
    for agent, batches in AGENT_BATCHES.items():
        end = start + batches * BATCH
        x = split.x_train[start:end].astype(np.float32).reshape(batches, BATCH, 8, 8, 1)
        y = split.y_train[start:end].astype(np.float32).reshape(batches, BATCH)
        data[agent], start = (x, y), end
    return data


def test_agents_parts_are_averaged_by_batches_and_sent_back_to_every_agent(
    tmp_path: Path, mosquitto: Any, topics: Topics
) -> None:
    model = build_reference_cnn()
    lower = export_lower_tflite(model, CUT, batch_size=BATCH)
    split: dict[str, Any] = {}

    def deliver(topic: str, payload: bytes) -> None:
        split["coordinator"].on_message(topic, payload)
        split["averager"].on_message(topic, payload)

    link = MqttLink(
        parse_broker_url(mosquitto.url), client_id=f"{topics.root}-coord", on_message=deliver
    )
    split["coordinator"] = SplitCoordinator(link, topics, UpperPart(model, CUT, learning_rate=LR))
    split["averager"] = PartAverager(link, topics, round_number=1, agents=AGENT_BATCHES)
    for topic_filter in (*split["coordinator"].subscriptions(), *split["averager"].subscriptions()):
        link.subscribe(topic_filter)
    link.start()
    link.wait_connected(10)
    split["coordinator"].start()
    agents = {}
    try:
        for agent, (x, y) in _data().items():
            (tmp_path / agent).mkdir()
            agents[agent] = _agent(
                tmp_path / agent, mosquitto.url, topics, lower, x, y, agent_id=agent, federate=True
            )
        for agent, process in agents.items():
            log = (tmp_path / agent / "agent.log").read_text
            assert process.wait(timeout=AVERAGE_TIMEOUT_S) == 0, log()
        assert split["averager"].done.wait(AVERAGE_TIMEOUT_S)
    finally:
        split["coordinator"].stop()
        link.stop()
        for process in agents.values():
            if process.poll() is None:
                process.kill()
    kept = {agent: dict(np.load(tmp_path / agent / "weights.npz")) for agent in AGENT_BATCHES}
    total = sum(AGENT_BATCHES.values())
    for name in ("w0", "w1"):
        local = {agent: kept[agent][f"local_{name}"] for agent in AGENT_BATCHES}
        assert not np.allclose(local["pi-1"], local["pi-2"])  # they trained apart
        want = sum(AGENT_BATCHES[a] * local[a].astype(np.float64) for a in AGENT_BATCHES) / total
        np.testing.assert_allclose(split["averager"].averaged[name], want, atol=1e-6)
        for agent in AGENT_BATCHES:  # each agent's part now holds the average
            np.testing.assert_allclose(kept[agent][name], want, atol=1e-6)
