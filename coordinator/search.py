"""Hyper-parameter search as a task: successive halving over disjoint groups of the fleet.

Every configuration of the search space is a *trial*: a task of its own (``<task>.t<i>``,
its own state, topics and model, see :mod:`coordinator.task_runs`) with the same model
recipe and a plan changed by the configuration. A *rung* runs every surviving trial at the
same time for a few rounds, each on its own group of agents (the scheduler hands the fleet
out disjointly and gives groups similar label mixes), then scores each trial by federated
evaluation (its agents' held-out accuracy of the trial's model) and keeps the better half;
survivors go on from their own weights, on bigger groups. The last one left is the winner,
and it goes on training on the whole fleet.

Why successive halving, with trials that resume: the fleet's rounds are the scarce thing,
and halving spends them where the scores say they are worth it (Jamieson and Talwalkar,
2016; Li et al.'s Hyperband adds brackets of different rung lengths, which pays off for
large spaces and long training, not for a handful of configurations on a small fleet);
trials resume from their own weights so no rung's rounds are thrown away, and the winner's
rounds count towards the fleet's training. Everything is recorded: each trial's rounds (with
their configuration and federated scores) in its own state, and the search (rungs, scores,
survivors, winner, rounds of the whole fleet spent) in the coordinator's state under
``search:<task>``.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.round_plan import RoundOutcome, RoundPlan
from coordinator.state import CoordinatorState
from coordinator.strategies import make_strategy
from coordinator.task_runs import TaskRuns
from protocol.errors import ConfigError, FedgeError

__all__ = [
    "SEARCH_PREFIX",
    "SearchResult",
    "Trial",
    "grid",
    "halving_rungs",
    "run_search",
    "score_of",
    "search_from_options",
    "start_search",
    "trial_plan",
]

logger = logging.getLogger(__name__)

# Keys of a search space: the round config's own, and two that pick a strategy.
CONFIG_KEYS = frozenset({"learning_rate", "epochs", "proximal_mu", "batch_size"})
STRATEGY_KEYS = frozenset({"server_lr"})
DEFAULT_EVAL_FRACTION = 0.2  # trials are scored on held-out samples: a search needs some
SEARCH_PREFIX = "search."  # start_rounds options: search.<key> = "v1,v2,...", search.rung_rounds
DEFAULT_RUNG_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class Trial:
    name: str
    options: dict[str, Any]

    def describe(self) -> str:
        return ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in sorted(self.options.items())
        )


@dataclass
class SearchResult:
    task: str
    trials: list[Trial]
    rungs: list[dict[str, Any]] = field(default_factory=list)
    winner: Trial | None = None
    fleet_rounds: int = 0  # rounds of the whole fleet: one per round of a rung, at once
    final: list[RoundOutcome] = field(default_factory=list)
    stopped: bool = False  # a stop request ended it before a winner

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "trials": {t.name: t.options for t in self.trials},
            "rungs": self.rungs,
            "winner": self.winner.name if self.winner else None,
            "winner_options": self.winner.options if self.winner else None,
            "fleet_rounds": self.fleet_rounds,
            "stopped": self.stopped,
        }


def grid(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the space's values, in a fixed order."""
    keys = sorted(space)
    unknown = [k for k in keys if k not in CONFIG_KEYS | STRATEGY_KEYS]
    if unknown:
        raise ConfigError(
            f"search space keys {unknown} unknown; known: {sorted(CONFIG_KEYS | STRATEGY_KEYS)}",
            reason="bad_search",
        )
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(space[k] for k in keys))
    ]


def halving_rungs(trials: int) -> list[int]:
    """How many trials each rung runs: all, then half (rounded up), ..., down to one."""
    if trials < 1:
        raise ConfigError("a search needs at least one configuration", reason="bad_search")
    rungs = [trials]
    while rungs[-1] > 1:
        rungs.append(math.ceil(rungs[-1] / 2))
    return rungs[:-1] or [1]


def trial_plan(base: RoundPlan, options: Mapping[str, Any], *, rounds: int) -> RoundPlan:
    """``base`` with a trial's options: round config keys, FedProx mu, a server lr."""
    config = {k: v for k, v in options.items() if k in CONFIG_KEYS}
    if base.config.eval_fraction == 0.0:
        config["eval_fraction"] = DEFAULT_EVAL_FRACTION
    strategy, strategy_options = base.strategy, dict(base.strategy_options)
    mu = float(options.get("proximal_mu", 0.0))
    if mu > 0.0:
        strategy, strategy_options = "fedprox", {"mu": mu}
        config.pop("proximal_mu")
    if "server_lr" in options:
        if strategy not in {"fedadam", "fedyogi"}:
            strategy, strategy_options = "fedadam", {}
        strategy_options["eta"] = float(options["server_lr"])
    make_strategy(strategy, **strategy_options)  # a bad value is refused before any round
    return replace(
        base,
        rounds=rounds,
        strategy=strategy,
        strategy_options=strategy_options,
        config=base.config.model_copy(update=config),
    )


def score_of(outcomes: Sequence[RoundOutcome]) -> float | None:
    """A trial's score: the federated accuracy of its newest round that has one."""
    for outcome in reversed(outcomes):
        if outcome.ok and outcome.metrics.get("federated_accuracy") is not None:
            return float(outcome.metrics["federated_accuracy"])
    return None


def run_search(
    tasks: TaskRuns,
    *,
    task: str,
    space: Mapping[str, Sequence[Any]],
    base: RoundPlan,
    rounds_per_rung: int,
    final_rounds: int = 0,
    record: CoordinatorState | None = None,
) -> SearchResult:
    """Search ``space`` for ``task`` by successive halving; then the winner trains alone."""
    started = time.monotonic()
    loaded = tasks.task(task)
    trials = [Trial(f"{task}.t{i}", options) for i, options in enumerate(grid(space))]
    for trial in trials:
        tasks.add(trial.name, *loaded)
    result = SearchResult(task=task, trials=trials)
    survivors = list(trials)
    for rung, count in enumerate(halving_rungs(len(trials))):
        survivors = survivors[:count]
        plans = {t.name: trial_plan(base, t.options, rounds=rounds_per_rung) for t in survivors}
        # Each trial waits for its share of the fleet, not more.
        share = max(1, tasks.able_agents(task) // len(survivors))
        plans = {
            name: replace(plan, min_agents=max(1, min(plan.min_agents, share)))
            for name, plan in plans.items()
        }
        for t in survivors:
            tasks.run(t.name).note = f"search rung {rung}: {t.describe()}"
        if tasks.stopped_since(task, started):
            result.stopped = True
            _save(record, result)
            return result
        outcomes = tasks.run_now(plans, hold=True)
        if tasks.stopped_since(task, started):
            result.stopped = True
            _save(record, result)
            logger.warning("search of %s stopped in rung %d", task, rung)
            return result
        result.fleet_rounds += rounds_per_rung
        scores = {t.name: score_of(outcomes[t.name]) for t in survivors}
        # Best score first; a trial with no score (no federated evaluation) last.
        ranked = sorted(survivors, key=lambda t: (-_or_worst(scores[t.name]), t.name))
        keep = max(1, math.ceil(len(survivors) / 2)) if count > 1 else 1
        result.rungs.append(
            {
                "rung": rung,
                "rounds": rounds_per_rung,
                "scores": scores,
                "agents": {t.name: _last_selected(tasks, t.name) for t in survivors},
                "kept": [t.name for t in ranked[:keep]],
            }
        )
        for t in survivors:
            kept = t in ranked[:keep]
            verdict = "kept" if kept else "halted"
            score = scores[t.name]
            shown = f"{score:.3f}" if score is not None else "none"
            tasks.run(t.name).note = f"rung {rung} {verdict}, score {shown}: {t.describe()}"
        logger.info("search %s rung %d: %s", task, rung, scores)
        survivors = ranked[:keep]
        _save(record, result)
    result.winner = survivors[0]
    tasks.run(result.winner.name).note = f"search winner: {result.winner.describe()}"
    _save(record, result)
    if final_rounds > 0:
        plan = trial_plan(base, result.winner.options, rounds=final_rounds)
        result.final = tasks.run_now({result.winner.name: plan})[result.winner.name]
        result.fleet_rounds += final_rounds
        _save(record, result)
    return result


def _or_worst(score: float | None) -> float:
    return -1.0 if score is None else score


def _last_selected(tasks: TaskRuns, name: str) -> list[str]:
    state = tasks.run(name).state
    record = state.round(state.last_round_number())
    return list(record.selected) if record is not None else []


def _save(record: CoordinatorState | None, result: SearchResult) -> None:
    if record is not None:
        record.put(f"search:{result.task}", result.to_json())


def search_from_options(
    options: Mapping[str, Any],
) -> tuple[dict[str, list[float]], int, dict[str, Any]]:
    """A start_rounds command's ``search.*`` options: the space, the rung length, the rest.

    ``search.learning_rate = "0.05,0.2"`` gives the values of one key; ``search.rung_rounds``
    the rounds of a rung. Values come from the network: anything that does not parse is a
    :class:`ConfigError` with reason ``bad_search``.
    """
    space: dict[str, list[float]] = {}
    rung_rounds = DEFAULT_RUNG_ROUNDS
    rest: dict[str, Any] = {}
    for key, value in options.items():
        if not key.startswith(SEARCH_PREFIX):
            rest[key] = value
            continue
        name = key[len(SEARCH_PREFIX) :]
        try:
            if name == "rung_rounds":
                rung_rounds = int(value)
                continue
            values = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError as exc:
            raise ConfigError(f"search option {key}={value!r}: {exc}", reason="bad_search") from exc
        space[name] = [int(v) if name in {"epochs", "batch_size"} else v for v in values]
    if space:
        grid(space)  # unknown keys are refused before any round
        if rung_rounds < 1:
            raise ConfigError("search.rung_rounds must be at least 1", reason="bad_search")
    return space, rung_rounds, rest


def start_search(
    tasks: TaskRuns,
    *,
    task: str,
    space: Mapping[str, Sequence[Any]],
    base: RoundPlan,
    rung_rounds: int,
    record: CoordinatorState | None = None,
) -> threading.Thread:
    """:func:`run_search` in a thread: ``base.rounds`` rounds of the whole fleet in all."""
    rungs = len(halving_rungs(len(grid(space))))
    final_rounds = base.rounds - rungs * rung_rounds
    if final_rounds < 0:
        raise ConfigError(
            f"{rungs} rungs of {rung_rounds} rounds do not fit in {base.rounds} rounds",
            reason="bad_search",
        )
    for options in grid(space):
        trial_plan(base, options, rounds=1)  # a bad value is refused now, not in the thread

    def search() -> None:
        try:
            run_search(
                tasks,
                task=task,
                space=space,
                base=base,
                rounds_per_rung=rung_rounds,
                final_rounds=final_rounds,
                record=record,
            )
        except FedgeError as exc:
            logger.warning("search of %s ended: %s", task, exc)
        except Exception:
            logger.exception("search of %s failed", task)

    thread = threading.Thread(target=search, name=f"search-{task}", daemon=True)
    tasks.track(thread)
    thread.start()
    return thread
