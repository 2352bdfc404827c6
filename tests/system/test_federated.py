"""Federated rounds through a real Mosquitto, with agents as separate processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from fedge.harness.federation import federation
from fedge.harness.phases import PHASES, round_phases
from protocol.messages.agent import AgentStatus
from protocol.messages.codec import decode_message
from protocol.messages.rounds import RoundConfig, UpdateEncoding
from protocol.topics import Topics
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    subscribe,
    wait_until,
)

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
        # Every agent stamped its steps and the coordinator its own: the phases add up to
        # the round's time.
        for outcome in outcomes:
            assert set(outcome.metrics["timings"]["agents"]) == {a.agent_id for a in fed.agents}
            record = coordinator.state.round(outcome.round)
            assert record is not None
            phases = round_phases(record.started_at, outcome.metrics)
            assert phases is not None
            assert sum(phases[name] for name in PHASES) == pytest.approx(phases["total"])
            assert phases["total"] <= outcome.metrics["seconds"]


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


def test_round_start_and_status_from_the_command_line_and_agents_hot_swap(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    common = ["--broker", mosquitto.url, "--fleet", topics.fleet, "--root", topics.root]
    with federation(tmp_path, mosquitto, topics, num_agents=2, trainer="litert") as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(2)
        started = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedge",
                "round",
                "start",
                *common,
                "--rounds",
                "2",
                "--min-agents",
                "2",
                "--deadline",
                "60s",
                "--encoding",
                "float16",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert started.returncode == 0, started.stderr
        assert "accepted" in started.stderr
        wait_until(
            lambda: len(coordinator.outcomes) == 2 and not coordinator.busy,
            180.0,
            what="two rounds done",
        )
        assert [o.version for o in coordinator.outcomes] == ["r1", "r2"]
        status = subprocess.run(
            [sys.executable, "-m", "fedge", "round", "status", *common],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert "r2" in status.stdout + status.stderr
        busy = subprocess.run(
            [sys.executable, "-m", "fedge", "round", "start", *common, "--strategy", "nope"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert busy.returncode != 0
        assert "unknown" in busy.stderr.lower()
        assert "Traceback" not in busy.stderr
        # Every agent now serves the newest release through its trainable model.
        collector = MessageCollector()
        watcher = mqtt_client(mosquitto, collector=collector)
        try:
            subscribe(watcher, topics.all_agent_statuses())

            def serving_r2(_messages: list[Received]) -> bool:
                latest: dict[str, str | None] = {}
                for message in collector.messages:
                    status_message = decode_message(message.payload, AgentStatus)
                    if status_message.capabilities is not None:
                        latest[status_message.agent] = status_message.capabilities.model_version
                return len(latest) == 2 and set(latest.values()) == {"r2"}

            collector.wait_for(serving_r2, 60.0)
        finally:
            disconnect(watcher)
