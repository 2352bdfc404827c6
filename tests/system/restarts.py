"""Helpers for the tests that SIGKILL Mosquitto under a running fleet.

A killed Mosquitto comes back on the same port, with whatever its last autosave held
(persistence on) or with nothing at all (persistence off).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from coordinator.daemon import Coordinator
from coordinator.rounds import RoundOutcome, RoundPlan
from fedge.harness.federation import Federation
from runtime.mosquitto import MosquittoProcess

__all__ = [
    "ROUND_DEADLINE_S",
    "checked",
    "crash",
    "has_persistence",
    "restarting_mosquitto",
    "round_completes",
]

ROUND_DEADLINE_S = 90.0
NO_PERSISTENCE = "persistence false"


def restarting_mosquitto(
    binary: Path, workdir: Path, *, persistence: bool, extra_config: Sequence[str] = ()
) -> MosquittoProcess:
    """A started Mosquitto, with the suite's config and persistence on or off."""
    extra = (*extra_config, *(() if persistence else (NO_PERSISTENCE,)))
    process = MosquittoProcess(binary, workdir, extra_config=extra)
    process.start()
    return process


def has_persistence(broker: MosquittoProcess) -> bool:
    return NO_PERSISTENCE not in broker.config_path.read_text()


def crash(broker: MosquittoProcess, times: int = 1) -> None:
    """SIGKILL the broker and start it again, ``times`` times in a row."""
    for _ in range(times):
        broker.kill()
        broker.start()


def round_completes(
    fed: Federation, coordinator: Coordinator, num_agents: int, *, wait_for_agents: bool = True
) -> RoundOutcome:
    """One round with every agent; it must close with each agent's update counted once."""
    if wait_for_agents:
        fed.wait_for_agents(num_agents)
    (outcome,) = coordinator.run_plan_now(
        RoundPlan(rounds=1, min_agents=num_agents, deadline_s=ROUND_DEADLINE_S)
    )
    return checked(fed, coordinator, outcome, num_agents)


def checked(
    fed: Federation, coordinator: Coordinator, outcome: RoundOutcome, num_agents: int
) -> RoundOutcome:
    """``outcome``, once it is shown to be a round closed with each agent's update once."""
    logs = "\n".join(agent.log()[-2000:] for agent in fed.agents)
    assert outcome.ok, f"{outcome.reason}\n{logs}"
    assert outcome.metrics["updates"] == num_agents  # each agent's update counted once
    assert len(coordinator.state.update_agents(outcome.round)) == num_agents
    return outcome
