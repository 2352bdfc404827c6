"""Which agents train which task, when several tasks run at once on one fleet.

Pure: agents and what each task needs in, a disjoint assignment out. An agent is *able* for a
task when it is online, can train (with one of the task's trainers, if the task names any) and
holds at least ``min_samples`` samples of the task's labels. Every agent has a budget of
trainings at a time (one by default, so a device never runs two tasks' training at once);
an agent already in a task's open round keeps that slot until the round closes.

The free slots are handed out greedily, in a fixed order, so every task's runner computes the
same assignment: agents that fit the fewest tasks first (a specialist goes where only it
fits), larger agents before smaller; each slot goes to the able task with the fewest agents
so far, and between equally served tasks to the one whose group holds the least of this
agent's labels, so groups of tasks that want the same data (the trials of a search) end up
with similar label mixes rather than one group of sevens and one of ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from coordinator.fleet import AgentInfo

__all__ = ["TaskNeeds", "able_for", "assign"]


@dataclass(frozen=True, slots=True)
class TaskNeeds:
    """What one task asks of the agents it trains on."""

    task: str
    labels: frozenset[str]
    min_samples: int = 1
    trainers: frozenset[str] = field(default_factory=frozenset)  # empty: any trainer
    max_agents: int | None = None


def _samples(agent: AgentInfo, labels: frozenset[str]) -> int:
    return sum(count for label, count in agent.samples_by_label if label in labels)


def able_for(needs: TaskNeeds, agent: AgentInfo) -> bool:
    """True if ``agent`` can train ``needs.task`` now: capability and data."""
    if not (agent.online and agent.can_train):
        return False
    # An agent that names no trainers is taken at its word, as the round's selection does.
    if needs.trainers and agent.trainers and not needs.trainers & set(agent.trainers):
        return False
    return _samples(agent, needs.labels) >= needs.min_samples


def assign(
    tasks: Sequence[TaskNeeds],
    agents: Iterable[AgentInfo],
    *,
    busy: Mapping[str, Iterable[str]] | None = None,
    budget: Mapping[str, int] | None = None,
    default_budget: int = 1,
) -> dict[str, tuple[str, ...]]:
    """Each task's agents: disjoint up to each agent's budget of trainings at a time.

    ``busy`` maps a task to the agents in its open round: they stay with it, whatever else
    they fit. ``budget`` overrides ``default_budget`` per agent.
    """
    by_task: dict[str, list[str]] = {needs.task: [] for needs in tasks}
    held: dict[str, dict[str, int]] = {needs.task: {} for needs in tasks}
    known = {agent.agent: agent for agent in agents}
    slots = {a: (budget or {}).get(a, default_budget) for a in known}
    for task, members in (busy or {}).items():
        for name in sorted(set(members)):
            if task in by_task and name in known:
                _give(task, known[name], by_task, held)
            slots[name] = slots.get(name, default_budget) - 1
    able = {a: [n for n in tasks if able_for(n, info)] for a, info in known.items()}
    order = sorted(
        known.values(),
        key=lambda a: (len(able[a.agent]), -sum(c for _, c in a.samples_by_label), a.agent),
    )
    for agent in order:
        candidates = [n for n in able[agent.agent] if agent.agent not in by_task[n.task]]
        while slots[agent.agent] > 0 and candidates:
            open_tasks = [
                n for n in candidates if n.max_agents is None or len(by_task[n.task]) < n.max_agents
            ]
            if not open_tasks:
                break
            chosen = min(
                open_tasks,
                key=lambda n: (len(by_task[n.task]), _overlap(held[n.task], agent)),
            )
            _give(chosen.task, agent, by_task, held)
            candidates.remove(chosen)
            slots[agent.agent] -= 1
    return {task: tuple(sorted(members)) for task, members in by_task.items()}


def _give(
    task: str,
    agent: AgentInfo,
    by_task: dict[str, list[str]],
    held: dict[str, dict[str, int]],
) -> None:
    by_task[task].append(agent.agent)
    for label, count in agent.samples_by_label:
        held[task][label] = held[task].get(label, 0) + count


def _overlap(group: Mapping[str, int], agent: AgentInfo) -> float:
    """How much of ``agent``'s data the group already has more of: 0 (none) to 1."""
    total = sum(count for _, count in agent.samples_by_label) or 1
    group_total = sum(group.values()) or 1
    return (
        sum(count * group.get(label, 0) / group_total for label, count in agent.samples_by_label)
        / total
    )
