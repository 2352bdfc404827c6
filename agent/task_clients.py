"""The agent's part in several tasks at once: one federated client per task, one training at a time.

A coordinator that runs several tasks on one fleet announces each task's rounds on the task's
own topics (``<root>/<fleet>/tasks/<task>/rounds/current``, see :mod:`protocol.topics`). The
agent listens to every task's announcement; the first one of a task makes that task's
:class:`~agent.federated.FederatedClient` (its own topics, its own directory of rounds done
and updates kept), which from then on follows the task like the fleet's own client follows
the fleet's rounds. The coordinator hands agents to tasks disjointly; the device keeps its
own budget too (``training_slots``, default one), so two tasks that select it at once train
one after the other instead of sharing its cores.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from agent.federated import FederatedClient
from protocol.errors import FedgeError
from protocol.messages.rounds import RoundAnnouncement
from protocol.topics import TopicKind

__all__ = ["MAX_TASKS", "TaskClients"]

logger = logging.getLogger(__name__)

MAX_TASKS = 64  # distinct tasks one agent follows; more is a flood, not a fleet


class _TaskClient(FederatedClient):
    """A task's client: trains only while it holds one of the device's training slots."""

    def __init__(self, *, slots: threading.Semaphore, **settings: Any) -> None:
        super().__init__(**settings)
        self._slots = slots

    def _on_announcement(self, announcement: RoundAnnouncement, received_at: float = 0.0) -> None:
        if self.agent_id not in announcement.selected:
            super()._on_announcement(announcement, received_at)
            return
        with self._slots:
            super()._on_announcement(announcement, received_at)


class TaskClients:
    """Every task this agent takes part in, made from the fleet client's own settings."""

    def __init__(self, template: FederatedClient, *, training_slots: int = 1) -> None:
        self._template = template
        self.topics = template.topics
        self._slots = threading.Semaphore(max(1, training_slots))
        self._clients: dict[str, _TaskClient] = {}
        self._lock = threading.Lock()
        self._started = False

    @property
    def tasks(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._clients))

    def client(self, task: str) -> FederatedClient | None:
        with self._lock:
            return self._clients.get(task)

    def start(self) -> None:
        self._started = True
        self._template._link.subscribe(self.topics.all_task_announcements(), qos=1)

    def stop(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.stop()

    # routing (network thread: quick)
    def handles(self, topic: str) -> bool:
        try:
            return self.topics.task_of(topic) is not None
        except FedgeError:
            return False

    def on_message(self, topic: str, payload: bytes) -> None:
        task = self.topics.task_of(topic)
        if task is None:
            return
        with self._lock:
            client = self._clients.get(task)
        if client is not None:
            if client.handles(topic):
                client.on_message(topic, payload)
            return
        if not payload or not self._started:
            return
        try:
            kind = self.topics.for_task(task).parse(topic).kind
        except FedgeError:
            return
        if kind is TopicKind.ROUND_CURRENT:
            # The new client subscribes to its task's announcement itself, and the broker
            # hands it the retained one: passing this copy on too would train twice.
            self._add(task)

    def _add(self, task: str) -> None:
        t = self._template
        with self._lock:
            if task in self._clients:
                return
            if len(self._clients) >= MAX_TASKS:
                t._report_error("too_many_tasks", f"task {task} not followed: {MAX_TASKS} are")
                return
            client = _TaskClient(
                slots=self._slots,
                agent_id=t.agent_id,
                topics=self.topics.for_task(task),
                link=t._link,
                publish_reliably=t._publish,
                report_error=t._report_error,
                store=t._store,
                data_dir=t._dir / "tasks" / task,
                verify_key=t._key,
                trainer_kind=t._trainer_kind,
                on_waiting=t._on_waiting,
                local_dp=t._local_dp,
            )
            self._clients[task] = client
        logger.info("following task %s", task)
        client.start()
