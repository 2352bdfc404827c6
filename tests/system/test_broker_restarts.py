"""A fleet that recovers when the broker forgets: Mosquitto SIGKILLed at several points.

fedge keeps the fleet's shared state in retained messages. A broker killed right after
the coordinator published release r0, with persistence off (or before its autosave), comes
back without r0's manifest and chunks: agents then waited for chunks that never came and
every later round failed. Here the broker is killed, with and without persistence, right
after the first release (before the agents have it), between rounds, and twice in a row;
each time the next round must complete with every selected agent's update counted once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.rounds import RoundOutcome, RoundPlan
from fedge.harness.federation import federation
from protocol.messages.codec import decode_message
from protocol.messages.rounds import RoundAnnouncement
from protocol.signing import SignedMessage
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess
from runtime.mqtt import MqttLink, parse_broker_url
from tests.faults import TcpProxy
from tests.system.restarts import (
    ROUND_DEADLINE_S,
    checked,
    crash,
    has_persistence,
    restarting_mosquitto,
    round_completes,
)

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


def test_an_agent_away_when_the_broker_lost_the_open_round_still_hears_of_it(
    mosquitto_binary: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The broker comes back with the release but without the round announced after its save.

    Its database (saved by hand; no autosave in between) holds release r1 and round 1's
    announcement, not round 2's. An agent whose link stopped delivering while round 2 was
    announced lost the queued announcement with the broker, and the retained one it gets on
    reconnecting is round 1's: only the coordinator noticing its open round missing can
    tell it.
    """
    workdir = tmp_path_factory.mktemp("saved-by-hand")
    broker = restarting_mosquitto(
        mosquitto_binary, workdir, persistence=True, extra_config=("autosave_interval 86400",)
    )
    topics = Topics(root=f"t-lost-round-{uuid.uuid4().hex[:8]}", fleet="test")
    try:
        with (
            TcpProxy(broker.host, broker.port) as away_link,
            federation(
                tmp_path,
                broker,
                topics,
                num_agents=NUM_AGENTS,
                per_agent={"agent-01": {"broker_url": away_link.url}},
            ) as fed,
        ):
            coordinator = fed.start_coordinator()
            round_completes(fed, coordinator, NUM_AGENTS)
            broker.persist()
            announced = threading.Event()
            watcher = _round_watcher(broker, topics, round_number=2, seen=announced)
            outcomes: list[RoundOutcome] = []
            away_link.hold_downstream()  # agent-01 hears nothing; the broker thinks it does
            running = threading.Thread(
                target=lambda: outcomes.extend(
                    coordinator.run_plan_now(
                        RoundPlan(rounds=1, min_agents=NUM_AGENTS, deadline_s=ROUND_DEADLINE_S)
                    )
                ),
                daemon=True,
            )
            running.start()
            assert announced.wait(ROUND_DEADLINE_S), "round 2 was never announced"
            watcher.stop()
            crash(broker)
            away_link.restore()
            running.join(3 * ROUND_DEADLINE_S)
            assert not running.is_alive(), "round 2 did not close"
            (outcome,) = outcomes
            assert outcome.round == 2
            checked(fed, coordinator, outcome, NUM_AGENTS)
            assert coordinator.keeper.republished >= 1
    finally:
        broker.stop()


def _round_watcher(
    broker: MosquittoProcess, topics: Topics, *, round_number: int, seen: threading.Event
) -> MqttLink:
    """A plain client that sets ``seen`` once the broker holds that round's announcement."""

    def on_message(_topic: str, payload: bytes) -> None:
        signed = decode_message(payload, SignedMessage)
        if RoundAnnouncement.model_validate_json(signed.body).round == round_number:
            seen.set()

    link = MqttLink(
        parse_broker_url(broker.url), client_id=f"{topics.root}-watcher", on_message=on_message
    )
    link.start()
    link.wait_connected(ROUND_DEADLINE_S)
    link.subscribe(topics.round_current(), qos=1)
    return link
