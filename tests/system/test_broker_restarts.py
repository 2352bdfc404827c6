"""A fleet that recovers when the broker forgets: Mosquitto SIGKILLed at several points.

fedge keeps the fleet's shared state in retained messages. A broker killed right after
the coordinator published release r0, with persistence off (or before its autosave), comes
back without r0's manifest and chunks: agents then waited for chunks that never came and
every later round failed. Here the broker is killed, with and without persistence, right
after the first release (before the agents have it), between rounds, and twice in a row;
each time the next round must complete with every selected agent's update counted once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.daemon import Coordinator
from coordinator.rounds import RoundOutcome, RoundPlan
from fedge.harness.federation import Federation, federation
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess

pytestmark = [pytest.mark.broker, pytest.mark.system]

NUM_AGENTS = 2
ROUND_DEADLINE_S = 90.0


@pytest.fixture(params=[True, False], ids=["persistence", "no-persistence"])
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: Path
) -> Iterator[MosquittoProcess]:
    extra = () if request.param else ("persistence false",)
    process = MosquittoProcess(
        mosquitto_binary, tmp_path_factory.mktemp("restarting-mosquitto"), extra_config=extra
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _crash(broker: MosquittoProcess, times: int = 1) -> None:
    for _ in range(times):
        broker.kill()
        broker.start()


def _round(fed: Federation, coordinator: Coordinator) -> RoundOutcome:
    fed.wait_for_agents(NUM_AGENTS)
    (outcome,) = coordinator.run_plan_now(
        RoundPlan(rounds=1, min_agents=NUM_AGENTS, deadline_s=ROUND_DEADLINE_S)
    )
    logs = "\n".join(agent.log()[-2000:] for agent in fed.agents)
    assert outcome.ok, f"{outcome.reason}\n{logs}"
    assert outcome.metrics["updates"] == NUM_AGENTS  # each agent's update counted once
    return outcome


def test_rounds_complete_after_the_broker_is_killed_at_several_points(
    broker: MosquittoProcess, tmp_path: Path
) -> None:
    topics = Topics(root=f"t-restarts-{uuid.uuid4().hex[:8]}", fleet="test")
    with federation(tmp_path, broker, topics, num_agents=NUM_AGENTS) as fed:
        coordinator = fed.start_coordinator()
        # Right after the first release, before the agents could have fetched it.
        _crash(broker)
        first = _round(fed, coordinator)
        # Between rounds.
        _crash(broker)
        second = _round(fed, coordinator)
        # Several times in a row.
        _crash(broker, times=3)
        third = _round(fed, coordinator)
        assert [first.round, second.round, third.round] == [1, 2, 3]
        if "persistence false" in broker.config_path.read_text():
            # Nothing survived: the coordinator had to put its state back.
            assert coordinator.keeper.republished >= 1
        rounds = [r for r in coordinator.state.rounds() if r.round >= 1]
        assert [r.state for r in rounds] == ["done", "done", "done"]
        for agent in fed.agents:
            assert "Traceback" not in agent.log(), agent.log()[-3000:]
