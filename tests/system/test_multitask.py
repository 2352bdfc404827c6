"""Several tasks on one fleet at once, through a real Mosquitto with agent processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.reference import write_agent_shares
from coordinator.rounds import RoundPlan
from fedge.harness.federation import federation
from fedge.harness.multitask import WORD_LABELS, relabelled_shares, write_task_file
from protocol.messages.codec import decode_message
from protocol.messages.rounds import CoordinatorStatus
from protocol.topics import Topics
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    subscribe,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]

ROUNDS = 8


def test_two_tasks_at_once_reach_what_each_reaches_alone(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    """Six agents: three hold digits named 0-9 (a CNN task), three named zero-nine (an MLP).

    Each task runs alone first, then a copy of each runs at the same time as the other's.
    """
    digits = write_agent_shares(tmp_path / "digits", 3)
    words = relabelled_shares(
        write_agent_shares(tmp_path / "words-src", 3),
        tmp_path / "words",
        dict(zip([str(i) for i in range(10)], WORD_LABELS, strict=True)),
    )
    tasks = [
        write_task_file(tmp_path / f"{name}.toml", name=name, model=model, labels=labels)
        for name, model, labels in [
            ("cnn-alone", "digits_cnn", None),
            ("mlp-alone", "digits_mlp", WORD_LABELS),
            ("cnn", "digits_cnn", None),
            ("mlp", "digits_mlp", WORD_LABELS),
        ]
    ]
    with federation(tmp_path, mosquitto, topics, num_agents=6, shares=[*digits, *words]) as fed:
        coordinator = fed.start_coordinator(tasks=[str(t) for t in tasks])
        fed.wait_for_agents(6)
        plan = RoundPlan(rounds=ROUNDS, min_agents=3, deadline_s=90.0)
        alone = coordinator.run_tasks_now({"cnn-alone": plan})
        alone |= coordinator.run_tasks_now({"mlp-alone": plan})
        collector = MessageCollector()
        watcher = mqtt_client(mosquitto, collector=collector)
        subscribe(watcher, topics.coordinator_status())
        together = coordinator.run_tasks_now({"cnn": plan, "mlp": plan})
        records = {name: coordinator.tasks.run(name).state.rounds() for name in ("cnn", "mlp")}
        final = collector.wait_for(lambda ms: _finished(ms, ("cnn", "mlp")) is not None)
        status = _finished(final, ("cnn", "mlp"))
        assert status is not None
        disconnect(watcher)
        for agent in fed.agents:
            assert "Traceback" not in agent.log()
    for name, outcomes in {**alone, **together}.items():
        assert [o.ok for o in outcomes] == [True] * ROUNDS, (name, [o.reason for o in outcomes])
    # Each task trained on its own three agents, whichever ran beside it.
    for name, group in (
        ("cnn", {"agent-00", "agent-01", "agent-02"}),
        ("mlp", {"agent-03", "agent-04", "agent-05"}),
    ):
        for record in records[name]:
            assert set(record.selected) == group, (name, record.round, record.selected)
    # The two ran at once: their rounds overlap in time.
    cnn_rounds, mlp_rounds = records["cnn"], records["mlp"]
    assert cnn_rounds[0].started_at < mlp_rounds[-1].finished_at  # type: ignore[operator]
    assert mlp_rounds[0].started_at < cnn_rounds[-1].finished_at  # type: ignore[operator]
    for name in ("cnn", "mlp"):
        alone_accuracy = alone[f"{name}-alone"][-1].metrics["accuracy"]
        together_accuracy = together[name][-1].metrics["accuracy"]
        assert abs(alone_accuracy - together_accuracy) <= 0.01, (
            name,
            alone_accuracy,
            together_accuracy,
        )
        assert together_accuracy > 0.5, (name, together_accuracy)
        assert status.tasks[name].round == ROUNDS
        assert status.tasks[name].accuracy == pytest.approx(together_accuracy)


def _finished(messages: list[Received], names: tuple[str, ...]) -> CoordinatorStatus | None:
    """The newest status in which every one of ``names`` is idle after its last round."""
    for message in reversed(messages):
        status = decode_message(message.payload, CoordinatorStatus)
        progress = [status.tasks.get(name) for name in names]
        if all(p is not None and p.round == ROUNDS and p.state.value == "idle" for p in progress):
            return status
    return None
