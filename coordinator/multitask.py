"""Several tasks on one fleet at once: a round runner per task, agents handed out disjointly.

Each task is its own :class:`~coordinator.rounds.RoundRunner`, with its own state file
(``<data_dir>/tasks/<task>/coordinator.sqlite``: its rounds, updates, releases), its own
producer and its own topics (``<root>/<fleet>/tasks/<task>/...``, see
:mod:`protocol.topics`), all over the coordinator's one MQTT link. The round logic is the
single-task one, unchanged: it only sees a :class:`TaskView` of the fleet, whose agents are
those the :class:`Leases` give the task. Leases ask :func:`coordinator.scheduler.assign`
for a disjoint assignment each time a task selects, and keep the agents of a task's open
round with it until that round closes, so a device never trains two tasks at once (unless
its budget says it may).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from coordinator.fleet import AgentInfo, Fleet, ReceivedUpdate, SecAggMessage
from coordinator.round_plan import ModelProducer
from coordinator.scheduler import TaskNeeds, assign
from protocol.messages.agent import ErrorEvent
from protocol.messages.base import Message
from protocol.messages.rounds import ModelMetrics, ModelRelease, RoundAnnouncement

__all__ = ["Leases", "SerialisedProducer", "TaskView"]

logger = logging.getLogger(__name__)

IsOpen = Callable[[], bool]


class Leases:
    """Which task holds which agents; every grant is computed under one lock."""

    def __init__(
        self,
        registry: Fleet,
        *,
        default_budget: int = 1,
        budget: Mapping[str, int] | None = None,
    ) -> None:
        self._registry = registry
        self._default_budget = default_budget
        self._budget = dict(budget or {})
        self._lock = threading.Lock()
        self._needs: dict[str, TaskNeeds] = {}
        self._held: dict[str, tuple[frozenset[str], IsOpen]] = {}

    def join(self, needs: TaskNeeds) -> None:
        with self._lock:
            self._needs[needs.task] = needs

    def leave(self, task: str) -> None:
        """The task runs no more rounds: its agents go to the others."""
        with self._lock:
            self._needs.pop(task, None)
            self._held.pop(task, None)

    @property
    def active(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._needs)

    def grant(self, task: str) -> frozenset[str]:
        """The agents ``task`` may select from now; held for it until it announces.

        Its share of the assignment of every active task (the same whatever is busy, so a
        task keeps its group from round to round), less the agents still in other tasks'
        open rounds up to their budget: an agent moved to it waits for its old round.
        """
        with self._lock:
            if task not in self._needs:
                return frozenset()
            held = [
                agents for t, (agents, is_open) in self._held.items() if t != task and is_open()
            ]
            mine = frozenset(
                agent
                for agent in self._assignment_locked()[task]
                if sum(agent in agents for agents in held)
                < self._budget.get(agent, self._default_budget)
            )
            # Until it announces, what it may pick is not anyone else's (a grant and an
            # announcement of another task never interleave on one agent).
            self._held[task] = (mine, lambda: True)
            return mine

    def announced(self, task: str, selected: Sequence[str], is_open: IsOpen) -> None:
        """``task`` opened a round: its selected agents are its until ``is_open()`` is False."""
        with self._lock:
            if task in self._needs:
                self._held[task] = (frozenset(selected), is_open)

    def assignment(self) -> dict[str, tuple[str, ...]]:
        """The current assignment of every active task (for status views)."""
        with self._lock:
            return self._assignment_locked()

    def _assignment_locked(self) -> dict[str, tuple[str, ...]]:
        return assign(
            list(self._needs.values()),
            self._registry.agents().values(),
            budget=self._budget,
            default_budget=self._default_budget,
        )


class TaskView(Fleet):
    """One task's fleet: its own topics (``inner``), and only the agents its lease grants."""

    def __init__(
        self,
        *,
        task: str,
        inner: Fleet,
        registry: Fleet,
        leases: Leases,
        is_open: IsOpen,
    ) -> None:
        self.task = task
        self.inner = inner
        self._registry = registry
        self._leases = leases
        self._is_open = is_open

    def agents(self) -> dict[str, AgentInfo]:
        granted = self._leases.grant(self.task)
        return {a: info for a, info in self._registry.agents().items() if a in granted}

    def publish_release(self, release: ModelRelease, blobs: dict[str, bytes]) -> int:
        return self.inner.publish_release(release, blobs)

    def announce(self, announcement: RoundAnnouncement) -> None:
        self._leases.announced(self.task, announcement.selected, self._is_open)
        self.inner.announce(announcement)

    def next_update(self, round_number: int, timeout_s: float) -> ReceivedUpdate | None:
        return self.inner.next_update(round_number, timeout_s)

    def reject(self, event: ErrorEvent, *, agent: str | None = None) -> None:
        self.inner.reject(event, agent=agent)

    def next_secagg(self, timeout_s: float) -> SecAggMessage | None:
        return self.inner.next_secagg(timeout_s)

    def publish_secagg(
        self, round_number: int, stage: str, message: Message, *, agent: str | None = None
    ) -> int:
        return self.inner.publish_secagg(round_number, stage, message, agent=agent)

    def now(self) -> float:
        return self.inner.now()

    def pause(self, seconds: float) -> None:
        self.inner.pause(seconds)


class SerialisedProducer(ModelProducer):
    """A producer whose calls take one process-wide lock.

    Keras seeds its initial weights globally and TensorFlow's converter is not made for two
    threads at once: tasks that build, evaluate or export at the same moment take turns.
    """

    def __init__(self, inner: ModelProducer, lock: threading.Lock) -> None:
        self.inner = inner
        self._lock = lock

    def initial_weights(self) -> list[np.ndarray]:
        with self._lock:
            return self.inner.initial_weights()

    def evaluate(self, weights: Sequence[np.ndarray]) -> ModelMetrics:
        with self._lock:
            return self.inner.evaluate(weights)

    def release(
        self,
        *,
        version: str,
        round_number: int,
        weights: Sequence[np.ndarray],
        metrics: ModelMetrics | None,
    ) -> tuple[ModelRelease, dict[str, bytes]]:
        with self._lock:
            return self.inner.release(
                version=version, round_number=round_number, weights=weights, metrics=metrics
            )
