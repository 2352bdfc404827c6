"""The hyper-parameter search against trying each configuration in turn, on one fleet.

Both run on the reference workload (REFERENCE.md: digits, non-IID over N agents, the CNN),
with agents as ``fedge agent run`` processes through a real Mosquitto, one after the other on
the same fleet. *Sequential*: every configuration trains on the whole fleet for ``rounds``
rounds, one configuration after another, and the best central accuracy wins. *Search*:
successive halving (:mod:`coordinator.search`) runs the configurations at once on disjoint
groups, ``rung_rounds`` rounds a rung, scored by federated evaluation; the winner then trains
on the whole fleet for what is left of ``rounds``. A round of the whole fleet is one round in
which every agent trains once: a rung's trials run at the same time, so a rung of r rounds
costs r of them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coordinator.round_plan import RoundOutcome, RoundPlan
from coordinator.search import grid, halving_rungs, run_search, trial_plan
from fedge.harness.federation import federation
from fedge.harness.multitask import write_task_file
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

__all__ = ["DEFAULT_CONFIG", "DEFAULT_SPACE", "compare_search", "search_table"]

DEFAULT_SPACE: dict[str, list[Any]] = {"learning_rate": [0.05, 0.2], "epochs": [1, 2]}
DEFAULT_CONFIG: dict[str, Any] = {"epochs": 1, "learning_rate": 0.05}  # REFERENCE.md's
DEADLINE_S = 180.0
AGENTS_ONLINE_TIMEOUT_S = 300.0


def _accuracies(outcomes: Sequence[RoundOutcome]) -> list[float | None]:
    return [o.metrics.get("accuracy") if o.ok else None for o in outcomes]


def compare_search(
    workdir: Path,
    *,
    agents: int = 10,
    space: Mapping[str, Sequence[Any]] = DEFAULT_SPACE,
    rounds: int = 10,
    rung_rounds: int = 3,
) -> dict[str, Any]:
    """Sequential trials, then the search, on one fleet; what each spent and picked."""
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto not found (apt install mosquitto)")
    configs = grid(space)
    if DEFAULT_CONFIG not in configs:
        raise SystemExit(f"the space must hold the default configuration {DEFAULT_CONFIG}")
    rungs = halving_rungs(len(configs))
    final_rounds = rounds - rung_rounds * len(rungs)
    if final_rounds < 0:
        raise SystemExit(f"{len(rungs)} rungs of {rung_rounds} rounds do not fit in {rounds}")
    files = [
        write_task_file(workdir / "tasks" / f"seq-{i}.toml", name=f"seq-{i}", model="digits_cnn")
        for i in range(len(configs))
    ]
    topics = Topics(root=f"bench-search-{uuid.uuid4().hex[:8]}", fleet="bench")
    broker = MosquittoProcess(binary, workdir / "broker")
    broker.start()
    try:
        with federation(workdir / "federation", broker, topics, num_agents=agents) as fed:
            coordinator = fed.start_coordinator(tasks=["digits_cnn", *map(str, files)])
            fed.wait_for_agents(agents, timeout_s=AGENTS_ONLINE_TIMEOUT_S)
            whole = RoundPlan(min_agents=agents, deadline_s=DEADLINE_S)
            sequential: list[dict[str, Any]] = []
            started = time.monotonic()
            for index, config in enumerate(configs):
                name = f"seq-{index}"
                plan = trial_plan(whole, config, rounds=rounds)
                outcomes = coordinator.run_tasks_now({name: plan})[name]
                sequential.append({"config": config, "accuracy": _accuracies(outcomes)})
            sequential_s = time.monotonic() - started
            started = time.monotonic()
            result = run_search(
                coordinator.tasks,
                task="digits_cnn",
                space=space,
                base=RoundPlan(deadline_s=DEADLINE_S),
                rounds_per_rung=rung_rounds,
                final_rounds=final_rounds,
                record=coordinator.state,
            )
            search_s = time.monotonic() - started
            trial_accuracy = {
                t.name: _accuracies(_outcomes_of(coordinator.tasks.run(t.name).state.rounds()))
                for t in result.trials
            }
    finally:
        broker.stop()
    assert result.winner is not None
    winner_index = [t.name for t in result.trials].index(result.winner.name)
    final_accuracy = [a for a in trial_accuracy[result.winner.name] if a is not None]
    return {
        "agents": agents,
        "space": {k: list(v) for k, v in space.items()},
        "rounds": rounds,
        "rung_rounds": rung_rounds,
        "sequential": {
            "configs": sequential,
            "fleet_rounds": rounds * len(configs),
            "picked": max(range(len(configs)), key=lambda i: sequential[i]["accuracy"][-1] or 0.0),
            "seconds": sequential_s,
        },
        "search": {
            **result.to_json(),
            "picked": winner_index,
            "trial_accuracy": trial_accuracy,
            "final_accuracy": final_accuracy[-1] if final_accuracy else None,
            "seconds": search_s,
        },
        "default": configs.index(DEFAULT_CONFIG),
    }


def _outcomes_of(records: Sequence[Any]) -> list[RoundOutcome]:
    return [
        RoundOutcome(
            r.round, ok=r.state == "done", version=None, reason=r.reason, metrics=r.metrics
        )
        for r in records
    ]


def search_table(report: Mapping[str, Any]) -> list[str]:
    """The comparison as text lines: one row per configuration, then the totals."""
    seq, search = report["sequential"], report["search"]
    scores = {name: [r["scores"].get(name) for r in search["rungs"]] for name in search["trials"]}
    lines = ["config                         | sequential acc | search rung scores    | search"]
    for index, entry in enumerate(seq["configs"]):
        name = list(search["trials"])[index]
        shown = " ".join(f"{s:.3f}" if s is not None else "  -  " for s in scores[name])
        tags = []
        if index == report["default"]:
            tags.append("default")
        if index == seq["picked"]:
            tags.append("sequential's pick")
        if index == search["picked"]:
            tags.append("search's pick")
        config = ", ".join(f"{k} {v}" for k, v in sorted(entry["config"].items()))
        accuracy = entry["accuracy"][-1] or 0.0
        lines.append(f"{config:<30} | {accuracy:>14.3f} | {shown:<21} | {', '.join(tags)}")
    default_acc = seq["configs"][report["default"]]["accuracy"][-1] or 0.0
    picked_acc = seq["configs"][search["picked"]]["accuracy"][-1] or 0.0
    lines.append(
        f"rounds of the whole fleet: sequential {seq['fleet_rounds']}, "
        f"search {search['fleet_rounds']} "
        f"({seq['fleet_rounds'] / search['fleet_rounds']:.1f}x fewer)"
    )
    lines.append(
        f"search's pick trained alone: {picked_acc:.3f} vs the default's {default_acc:.3f}; "
        f"the search's own model after its {search['fleet_rounds']} rounds: "
        f"{search['final_accuracy'] or 0.0:.3f}"
    )
    lines.append(f"wall: sequential {seq['seconds']:.0f} s, search {search['seconds']:.0f} s")
    return lines
