"""An agent that serves and trains in LiteRT never loads TensorFlow, even where it is installed.

Before, the automatic trainer choice took the Keras trainer whenever TensorFlow was
importable: an agent went from about 113 MB resident idle to 836 MB once selected for a
round. Here TensorFlow is importable (no blocker on the path), the trainer is ``auto``, the
agent follows a fleet release and trains a round, and afterwards no TensorFlow library is
mapped into its process; its status reports its resident memory.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from fedge.harness.federation import federation
from protocol.messages.agent import AgentStatus
from protocol.messages.codec import decode_message
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess
from tests.brokers import MessageCollector, disconnect, mqtt_client, subscribe

pytestmark = [pytest.mark.broker, pytest.mark.system]


def test_a_litert_agent_never_maps_tensorflow_and_reports_its_memory(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    topics = Topics(root=f"t-memory-{uuid.uuid4().hex[:8]}", fleet="test")
    with federation(
        tmp_path, mosquitto, topics, num_agents=1, trainer="auto", block_tensorflow=False
    ) as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(1)
        (outcome,) = coordinator.run_plan_now(RoundPlan(rounds=1, min_agents=1, deadline_s=120.0))
        assert outcome.ok, outcome.reason
        (agent,) = fed.agents
        assert agent.process is not None
        maps = Path(f"/proc/{agent.process.pid}/maps").read_text()
        tensorflow = sorted(
            {line.split()[-1] for line in maps.splitlines() if "tensorflow" in line}
        )
        assert tensorflow == [], tensorflow
        collector = MessageCollector()
        client = mqtt_client(mosquitto, collector=collector)
        try:
            subscribe(client, topics.agent_status(agent.agent_id))
            # The retained status first; a fresh one may follow it.
            retained = collector.wait_for_topic(topics.agent_status(agent.agent_id))[0]
        finally:
            disconnect(client)
        status = decode_message(retained.payload, AgentStatus)
        assert status.resident_bytes is not None
        assert status.resident_bytes > 10 * 1024 * 1024
        assert status.capabilities is not None
        assert status.capabilities.can_train
