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

from fedge.harness.federation import federation
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess
from tests.system.restarts import crash, has_persistence, restarting_mosquitto, round_completes

pytestmark = [pytest.mark.broker, pytest.mark.system]

NUM_AGENTS = 2


@pytest.fixture(params=[True, False], ids=["persistence", "no-persistence"])
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: Path
) -> Iterator[MosquittoProcess]:
    workdir = tmp_path_factory.mktemp("restarting-mosquitto")
    process = restarting_mosquitto(mosquitto_binary, workdir, persistence=request.param)
    try:
        yield process
    finally:
        process.stop()


def test_rounds_complete_after_the_broker_is_killed_at_several_points(
    broker: MosquittoProcess, tmp_path: Path
) -> None:
    topics = Topics(root=f"t-restarts-{uuid.uuid4().hex[:8]}", fleet="test")
    with federation(tmp_path, broker, topics, num_agents=NUM_AGENTS) as fed:
        coordinator = fed.start_coordinator()
        # Right after the first release, before the agents could have fetched it.
        crash(broker)
        first = round_completes(fed, coordinator, NUM_AGENTS)
        # Between rounds.
        crash(broker)
        second = round_completes(fed, coordinator, NUM_AGENTS)
        # Several times in a row.
        crash(broker, times=3)
        third = round_completes(fed, coordinator, NUM_AGENTS)
        assert [first.round, second.round, third.round] == [1, 2, 3]
        if not has_persistence(broker):
            # Nothing survived: the coordinator had to put its state back.
            assert coordinator.keeper.republished >= 1
        rounds = [r for r in coordinator.state.rounds() if r.round >= 1]
        assert [r.state for r in rounds] == ["done", "done", "done"]
        for agent in fed.agents:
            assert "Traceback" not in agent.log(), agent.log()[-3000:]
