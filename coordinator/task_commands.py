"""A start_rounds command for one of several tasks: its rounds, or a search for it."""

from __future__ import annotations

from coordinator.plans import plan_from_command
from coordinator.search import grid, search_from_options, start_search
from coordinator.state import CoordinatorState
from coordinator.task_runs import TaskRuns
from protocol.messages.commands import StartRounds

__all__ = ["start_task"]

Detail = dict[str, str | int | float | bool | None]


def start_task(tasks: TaskRuns, command: StartRounds, *, record: CoordinatorState) -> Detail:
    """Start ``command.task``'s rounds (or its ``search.*`` search); the ack's detail.

    Everything the network may have got wrong (an unknown task, bad options, a search that
    does not fit its rounds) raises :class:`~protocol.errors.FedgeError` before any round.
    """
    task = command.task
    assert task is not None
    tasks.run(task)  # an unknown task is refused before its options
    space, rung_rounds, options = search_from_options(command.options)
    command = command.model_copy(update={"options": options})
    plan = plan_from_command(command, defaults=tasks.defaults(task))
    if space:
        start_search(
            tasks, task=task, space=space, base=plan, rung_rounds=rung_rounds, record=record
        )
        return {"task": task, "rounds": plan.rounds, "search": len(grid(space))}
    run = tasks.start(task, plan)
    return {
        "task": task,
        "rounds": plan.rounds,
        "strategy": plan.strategy,
        "next_round": run.state.last_round_number() + 1,
    }
