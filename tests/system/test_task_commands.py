"""Tasks and searches started and stopped by command, through a real Mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.control.remote import send_command
from fedge.harness.federation import federation
from protocol.messages.commands import StartRounds, StopRounds
from protocol.topics import Topics
from runtime.mqtt import parse_broker_url
from tests.brokers import MosquittoProcess

pytestmark = [pytest.mark.broker, pytest.mark.system]


def test_task_commands_are_answered_and_a_search_stops_when_asked(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with federation(tmp_path, mosquitto, topics, num_agents=0, shares=[]) as fed:
        coordinator = fed.start_coordinator(tasks=["digits_cnn"])
        broker = parse_broker_url(mosquitto.url)

        def send(command: StartRounds | StopRounds):  # type: ignore[no-untyped-def]
            return send_command(
                broker,
                command_topic=topics.coordinator_commands(),
                events_topic=topics.coordinator_events(),
                command=command,
            )

        unknown = send(StartRounds(command_id="c1", task="nope"))
        assert (unknown.ok, unknown.reason) == (False, "unknown_task")
        bad = send(
            StartRounds(command_id="c2", task="digits_cnn", options={"search.momentum": "1"})
        )
        assert (bad.ok, bad.reason) == (False, "bad_search")
        too_long = send(
            StartRounds(
                command_id="c3",
                task="digits_cnn",
                rounds=1,
                options={"search.learning_rate": "0.05,0.2,0.4", "search.rung_rounds": 1},
            )
        )
        assert (too_long.ok, too_long.reason) == (False, "bad_search")  # 2 rungs, 1 round
        search = send(
            StartRounds(
                command_id="c4",
                task="digits_cnn",
                rounds=4,
                deadline_s=600.0,
                options={"search.learning_rate": "0.05,0.2", "search.rung_rounds": 2},
            )
        )
        assert search.ok, search.message
        assert search.detail["search"] == 2
        busy = send(StartRounds(command_id="c5"))  # the fleet's own rounds wait for tasks
        assert (busy.ok, busy.reason) == (False, "busy")
        # No agent is online: both trials wait for theirs until the stop.
        stopped = send(StopRounds(command_id="c6", task="digits_cnn", reason="test"))
        assert stopped.ok
        assert stopped.detail["stopping"] is True
        for trial in ("digits_cnn.t0", "digits_cnn.t1"):
            coordinator.tasks.run(trial).join(60.0)
            assert not coordinator.tasks.run(trial).busy
