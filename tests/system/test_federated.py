"""Federated rounds through a real Mosquitto, with agents as separate processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from protocol.messages.rounds import RoundConfig, UpdateEncoding
from protocol.topics import Topics
from tests.brokers import MosquittoProcess
from tests.system.federation import federation

pytestmark = [pytest.mark.broker, pytest.mark.system]

FLOWER_ROUND_30_ACCURACY = 0.878


def test_a_few_rounds_with_litert_agents_that_cannot_import_tensorflow(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with federation(tmp_path, mosquitto, topics, num_agents=3, trainer="litert") as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(3)
        outcomes = coordinator.run_plan_now(
            RoundPlan(
                rounds=3,
                min_agents=3,
                deadline_s=60.0,
                config=RoundConfig(update_encoding=UpdateEncoding.INT8),
            )
        )
        assert [o.ok for o in outcomes] == [True, True, True], [o.reason for o in outcomes]
        assert all(o.metrics["updates"] == 3 for o in outcomes)
        accuracies = [o.metrics["accuracy"] for o in outcomes]
        assert accuracies[-1] > accuracies[0]
        for agent in fed.agents:
            assert "Traceback" not in agent.log()


@pytest.mark.parametrize(
    ("trainer", "block_tensorflow"),
    [("litert", True), ("keras", False)],
    ids=["litert-without-tensorflow", "keras"],
)
def test_reference_workload_reaches_flowers_accuracy(
    trainer: str,
    block_tensorflow: bool,
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
) -> None:
    """REFERENCE.md's workload: 10 agents, non-IID digits, FedAvg, 30 rounds."""
    with federation(
        tmp_path,
        mosquitto,
        topics,
        num_agents=10,
        trainer=trainer,
        block_tensorflow=block_tensorflow,
    ) as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(10)
        outcomes = coordinator.run_plan_now(
            RoundPlan(rounds=30, min_agents=10, deadline_s=120.0, strategy="fedavg")
        )
    assert all(o.ok for o in outcomes), [o.reason for o in outcomes if not o.ok]
    accuracies = [o.metrics["accuracy"] for o in outcomes]
    print(f"{trainer}: accuracy by round {[round(a, 3) for a in accuracies]}")
    assert max(accuracies) >= FLOWER_ROUND_30_ACCURACY
    assert all(o.metrics["updates"] == 10 for o in outcomes)
