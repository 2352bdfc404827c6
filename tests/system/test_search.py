"""A hyper-parameter search through a real Mosquitto: trials at once on disjoint groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from coordinator.search import run_search
from fedge.harness.federation import federation
from protocol.topics import Topics
from tests.brokers import MosquittoProcess

pytestmark = [pytest.mark.broker, pytest.mark.system]

SPACE: dict[str, list[float]] = {"learning_rate": [0.05, 0.2], "epochs": [1, 2]}


def test_successive_halving_on_disjoint_groups_then_the_winner_on_the_whole_fleet(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with federation(tmp_path, mosquitto, topics, num_agents=4) as fed:
        coordinator = fed.start_coordinator(tasks=["digits_cnn"])
        fed.wait_for_agents(4)
        result = run_search(
            coordinator.tasks,
            task="digits_cnn",
            space=SPACE,
            base=RoundPlan(deadline_s=90.0),
            rounds_per_rung=2,
            final_rounds=2,
            record=coordinator.state,
        )
        recorded = coordinator.state.get("search:digits_cnn")
        winner = coordinator.tasks.run(result.winner.name)  # type: ignore[union-attr]
        final_rounds = winner.state.rounds()[-2:]
        trial_configs = {
            t.name: coordinator.tasks.run(t.name).state.rounds()[0].config for t in result.trials
        }
        for agent in fed.agents:
            assert "Traceback" not in agent.log()
    first, second = result.rungs
    # Rung 0: four trials at once, one agent each, no agent in two.
    groups = list(first["agents"].values())
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1]
    assert len({a for g in groups for a in g}) == 4
    assert all(score is not None for score in first["scores"].values())
    # Rung 1: the better half, two agents each; the best of those wins.
    assert sorted(second["scores"]) == sorted(first["kept"])
    assert sorted(len(g) for g in second["agents"].values()) == [2, 2]
    best = max(first["scores"][n] for n in first["kept"])
    assert all(first["scores"][n] <= best for n in first["scores"])
    assert result.winner is not None
    assert [result.winner.name] == second["kept"]
    # The winner then trains on the whole fleet, and all of it is in the record.
    assert all(len(r.selected) == 4 and r.state == "done" for r in final_rounds)
    assert result.fleet_rounds == 2 + 2 + 2 < len(result.trials) * 2 * 2
    assert recorded["winner"] == result.winner.name
    assert [r["scores"] for r in recorded["rungs"]] == [first["scores"], second["scores"]]
    for trial in result.trials:
        config = trial_configs[trial.name]
        assert (config["learning_rate"], config["epochs"]) == (
            trial.options["learning_rate"],
            trial.options["epochs"],
        )
