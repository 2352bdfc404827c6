"""The pure parts of the hyper-parameter search: the space, the rungs, each trial's plan."""

from __future__ import annotations

import pytest

from coordinator.round_plan import RoundOutcome, RoundPlan
from coordinator.search import grid, halving_rungs, score_of, search_from_options, trial_plan
from protocol.errors import ConfigError, FedgeError


def test_the_grid_is_every_combination_in_a_fixed_order() -> None:
    space: dict[str, list[float]] = {"learning_rate": [0.05, 0.2], "epochs": [1, 2]}
    assert grid(space) == [
        {"epochs": 1, "learning_rate": 0.05},
        {"epochs": 1, "learning_rate": 0.2},
        {"epochs": 2, "learning_rate": 0.05},
        {"epochs": 2, "learning_rate": 0.2},
    ]
    with pytest.raises(ConfigError, match="unknown"):
        grid({"momentum": [0.9]})


@pytest.mark.parametrize(
    ("trials", "rungs"), [(1, [1]), (2, [2]), (4, [4, 2]), (5, [5, 3, 2]), (8, [8, 4, 2])]
)
def test_each_rung_keeps_half_until_two_are_left(trials: int, rungs: list[int]) -> None:
    assert halving_rungs(trials) == rungs


def test_a_trial_plan_carries_its_options_into_config_and_strategy() -> None:
    base = RoundPlan(rounds=30, min_agents=3)
    plan = trial_plan(base, {"learning_rate": 0.2, "epochs": 2}, rounds=5)
    assert (plan.rounds, plan.min_agents, plan.strategy) == (5, 3, "fedavg")
    assert (plan.config.learning_rate, plan.config.epochs) == (0.2, 2)
    assert plan.config.eval_fraction == 0.2  # scored on held-out samples
    prox = trial_plan(base, {"proximal_mu": 0.1}, rounds=5)
    assert (prox.strategy, prox.strategy_options) == ("fedprox", {"mu": 0.1})
    assert trial_plan(base, {"proximal_mu": 0.0}, rounds=5).strategy == "fedavg"
    adam = trial_plan(base, {"server_lr": 0.03}, rounds=5)
    assert (adam.strategy, adam.strategy_options) == ("fedadam", {"eta": 0.03})
    with pytest.raises(FedgeError):
        trial_plan(base, {"server_lr": -1.0}, rounds=5)


def test_a_trial_is_scored_by_its_newest_federated_accuracy() -> None:
    def outcome(number: int, *, ok: bool, **metrics: float) -> RoundOutcome:
        return RoundOutcome(number, ok=ok, version=None, reason=None, metrics=dict(metrics))

    assert score_of([]) is None
    assert score_of([outcome(1, ok=True, accuracy=0.9)]) is None
    rounds = [
        outcome(1, ok=True, federated_accuracy=0.5),
        outcome(2, ok=True, federated_accuracy=0.7),
        outcome(3, ok=False, federated_accuracy=0.9),
    ]
    assert score_of(rounds) == 0.7


def test_a_command_names_its_search_in_search_options() -> None:
    options = {
        "search.learning_rate": "0.05,0.2",
        "search.epochs": "1,2",
        "search.rung_rounds": 4,
        "update_encoding": "int8",
    }
    space, rung_rounds, rest = search_from_options(options)
    assert space == {"learning_rate": [0.05, 0.2], "epochs": [1, 2]}
    assert (rung_rounds, rest) == (4, {"update_encoding": "int8"})
    assert search_from_options({"mu": 0.1}) == ({}, 3, {"mu": 0.1})
    for bad in ({"search.learning_rate": "fast"}, {"search.momentum": "0.9"}):
        with pytest.raises(ConfigError) as caught:
            search_from_options(bad)
        assert caught.value.reason == "bad_search"
