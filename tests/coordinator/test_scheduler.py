"""Handing agents to tasks that run at once: capability, data, budget, open rounds."""

from __future__ import annotations

import itertools

from coordinator.fleet import AgentInfo, InMemoryFleet
from coordinator.multitask import Leases, TaskView
from coordinator.scheduler import TaskNeeds, able_for, assign

DIGITS = frozenset(str(i) for i in range(10))
WORDS = frozenset({"cat", "dog"})


def agent(name: str, labels: dict[str, int], **extra: object) -> AgentInfo:
    settings: dict[str, object] = {"online": True, "can_train": True, "trainers": ("litert",)}
    settings |= extra
    return AgentInfo(name, samples_by_label=tuple(sorted(labels.items())), **settings)  # type: ignore[arg-type]


def test_an_agent_is_able_for_a_task_by_capability_and_data() -> None:
    needs = TaskNeeds("digits", DIGITS, min_samples=5)
    assert able_for(needs, agent("a", {"3": 5}))
    assert not able_for(needs, agent("a", {"3": 4, "cat": 100}))
    assert not able_for(needs, agent("a", {"3": 50}, online=False))
    assert not able_for(needs, agent("a", {"3": 50}, can_train=False))
    keras_only = TaskNeeds("digits", DIGITS, trainers=frozenset({"keras"}))
    assert not able_for(keras_only, agent("a", {"3": 50}))
    assert able_for(keras_only, agent("a", {"3": 50}, trainers=("litert", "keras")))
    assert able_for(keras_only, agent("a", {"3": 50}, trainers=()))  # taken at its word


def test_agents_go_to_the_task_whose_labels_they_hold() -> None:
    agents = [agent(f"d{i}", {"1": 10}) for i in range(3)]
    agents += [agent(f"w{i}", {"cat": 10}) for i in range(3)]
    result = assign([TaskNeeds("digits", DIGITS), TaskNeeds("words", WORDS)], agents)
    assert result == {"digits": ("d0", "d1", "d2"), "words": ("w0", "w1", "w2")}


def test_agents_that_fit_both_tasks_are_split_and_never_shared() -> None:
    agents = [agent(f"a{i}", {"1": 10 + i, "cat": 10}) for i in range(7)]
    agents.append(agent("only-digits", {"1": 3}))
    tasks = [TaskNeeds("digits", DIGITS), TaskNeeds("words", WORDS)]
    result = assign(tasks, agents)
    assert set(result["digits"]).isdisjoint(result["words"])
    assert len(result["digits"]) + len(result["words"]) == 8
    assert abs(len(result["digits"]) - len(result["words"])) <= 1
    assert "only-digits" in result["digits"]
    assert assign(list(reversed(tasks)), list(reversed(agents))) == result  # deterministic


def test_a_budget_of_two_lets_an_agent_train_two_tasks() -> None:
    agents = [agent("a", {"1": 10, "cat": 10}), agent("b", {"1": 10, "cat": 10})]
    tasks = [TaskNeeds("digits", DIGITS), TaskNeeds("words", WORDS)]
    assert assign(tasks, agents, budget={"a": 2}) in (
        {"digits": ("a",), "words": ("a", "b")},
        {"digits": ("a", "b"), "words": ("a",)},
    )
    assert assign(tasks, agents, default_budget=2) == {
        "digits": ("a", "b"),
        "words": ("a", "b"),
    }


def test_an_agent_in_an_open_round_stays_with_its_task() -> None:
    agents = [agent(f"a{i}", {"1": 10, "cat": 10}) for i in range(4)]
    tasks = [TaskNeeds("digits", DIGITS), TaskNeeds("words", WORDS)]
    result = assign(tasks, agents, busy={"digits": ["a0", "a1", "a2"]})
    assert result == {"digits": ("a0", "a1", "a2"), "words": ("a3",)}


def test_groups_of_tasks_that_want_the_same_data_get_similar_label_mixes() -> None:
    # Four agents of sevens and four of ones: two trials should each get both kinds.
    agents = [agent(f"s{i}", {"7": 20}) for i in range(4)]
    agents += [agent(f"o{i}", {"1": 20}) for i in range(4)]
    result = assign([TaskNeeds("t0", DIGITS), TaskNeeds("t1", DIGITS)], agents)
    for members in result.values():
        assert sorted(m[0] for m in members) == ["o", "o", "s", "s"]


def test_leases_keep_two_tasks_apart_until_a_round_closes() -> None:
    registry = InMemoryFleet(
        known={a.agent: a for a in (agent(f"a{i}", {"1": 5}) for i in range(4))}
    )
    leases = Leases(registry)
    open_rounds = {"x": False, "y": False}
    views = {
        name: TaskView(
            task=name,
            inner=InMemoryFleet(),
            registry=registry,
            leases=leases,
            is_open=lambda name=name: open_rounds[name],  # type: ignore[misc]
        )
        for name in ("x", "y")
    }
    leases.join(TaskNeeds("x", DIGITS))
    alone = set(views["x"].agents())
    assert alone == {"a0", "a1", "a2", "a3"}  # alone, a task gets every able agent
    # x opens a round with all four; y, joining meanwhile, gets none until it closes.
    leases.announced("x", sorted(alone), lambda: open_rounds["x"])
    open_rounds["x"] = True
    leases.join(TaskNeeds("y", DIGITS))
    assert views["y"].agents() == {}
    open_rounds["x"] = False
    got_y = set(views["y"].agents())
    got_x = set(views["x"].agents())
    assert got_x.isdisjoint(got_y)
    assert len(got_x) == len(got_y) == 2
    leases.leave("x")
    leases.announced("y", sorted(got_y), lambda: False)
    assert set(views["y"].agents()) == alone


def test_every_assignment_is_disjoint_whatever_the_mix() -> None:
    labels = [{"1": 5}, {"cat": 5}, {"1": 5, "cat": 5}, {"bird": 1}]
    for mix in itertools.product(range(len(labels)), repeat=5):
        agents = [agent(f"a{i}", labels[k]) for i, k in enumerate(mix)]
        result = assign([TaskNeeds("digits", DIGITS), TaskNeeds("words", WORDS)], agents)
        assert set(result["digits"]).isdisjoint(result["words"])
        for name, needs in (("digits", DIGITS), ("words", WORDS)):
            fits = {a.agent for a in agents if able_for(TaskNeeds(name, needs), a)}
            assert set(result[name]) <= fits
        assigned = set(result["digits"]) | set(result["words"])
        assert assigned == {a.agent for a in agents if a.samples_by_label[0][0] != "bird"}


def test_a_task_keeps_its_group_from_round_to_round_while_others_run() -> None:
    agents = [agent(f"a{i}", {"1": 10 + i, "cat": 5 * i}) for i in range(5)]
    registry = InMemoryFleet(known={a.agent: a for a in agents})
    leases = Leases(registry)
    names = ("t0", "t1", "t2")
    for name in names:
        leases.join(TaskNeeds(name, DIGITS))
    is_open = dict.fromkeys(names, False)
    first = {}
    for name in names:
        first[name] = leases.grant(name)
        leases.announced(name, sorted(first[name]), lambda name=name: is_open[name])  # type: ignore[misc]
        is_open[name] = True
    assert sum(len(g) for g in first.values()) == 5
    for name in names:  # each closes its round and selects again while the others run
        is_open[name] = False
        assert leases.grant(name) == first[name]
        leases.announced(name, sorted(first[name]), lambda name=name: is_open[name])  # type: ignore[misc]
        is_open[name] = True
