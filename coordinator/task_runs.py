"""The coordinator's tasks that run at once: one :class:`TaskRun` per task, over one link.

A task run owns what a single-task coordinator owns (state file, producer, MQTT fleet on the
task's topics, round runner, worker thread); :class:`TaskRuns` owns the runs, the leases
that hand agents out (:mod:`coordinator.multitask`) and the routing of the link's messages
to the run whose topics they are on. The fleet's own task keeps the daemon's runner and
the fleet-wide topics, exactly as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.fleet import Fleet
from coordinator.mqtt_fleet import MqttFleet
from coordinator.multitask import Leases, SerialisedProducer, TaskView
from coordinator.round_plan import RoundOutcome, RoundPlan
from coordinator.rounds import RoundRunner
from coordinator.scheduler import TaskNeeds, able_for
from coordinator.state import CoordinatorState
from coordinator.task_producers import make_producer
from coordinator.task_resume import check_resumable
from coordinator.tasks import LoadedTask, builtin_task, load_task
from protocol.errors import ConfigError, FedgeError
from protocol.messages.rounds import CoordinatorState as Phase
from protocol.messages.rounds import TaskProgress
from protocol.signing import SigningKey
from protocol.tasks import BUILTIN_MODELS
from runtime.mqtt import MqttLink

__all__ = ["TaskRun", "TaskRuns", "load_tasks", "task_defaults"]

logger = logging.getLogger(__name__)

# One lock for every task's Keras and TensorFlow work (see SerialisedProducer).
_MODEL_LOCK = threading.Lock()


def load_tasks(entries: tuple[str, ...]) -> dict[str, tuple[LoadedTask, Path | None]]:
    """The ``tasks`` setting: built-in model names or task files, by task name."""
    tasks: dict[str, tuple[LoadedTask, Path | None]] = {}
    for entry in entries:
        path = None if entry in BUILTIN_MODELS else Path(entry)
        task = builtin_task(entry) if path is None else load_task(path)
        if task.spec.name in tasks:
            raise ConfigError(f"two tasks are named {task.spec.name}", reason="bad_task")
        tasks[task.spec.name] = (task, path)
    return tasks


def task_defaults(task: LoadedTask) -> dict[str, Any]:
    training = task.spec.training
    return {
        "epochs": training.epochs,
        "learning_rate": training.learning_rate,
        "validation_fraction": training.validation_fraction,
        "min_samples": training.min_samples,
        "eval_fraction": training.eval_fraction,
    }


class TaskRun:
    """One task of several: its own state, producer, topics, round runner and thread."""

    def __init__(
        self,
        *,
        name: str,
        task: LoadedTask,
        config: CoordinatorConfig,
        link: MqttLink,
        signing_key: SigningKey,
        registry: Fleet,
        leases: Leases,
        on_change: Callable[[], None] | None = None,
        on_outcome: Callable[[str, RoundOutcome], None] | None = None,
    ) -> None:
        self.name = name
        self.task = task
        directory = config.data_dir / "tasks" / name
        self.state = CoordinatorState(directory / "coordinator.sqlite")
        self.topics = config.topics.for_task(name)
        self.fleet = MqttFleet(
            link, self.topics, signing_key, max_chunk_bytes=config.max_chunk_bytes
        )
        self.producer = SerialisedProducer(
            make_producer(task, config=config, state=self.state), _MODEL_LOCK
        )
        # A task file edited since its last run is refused, as the fleet's own task is.
        check_resumable(task, self.state, self.producer.initial_weights, directory)
        self.view = TaskView(
            task=name, inner=self.fleet, registry=registry, leases=leases, is_open=self.round_open
        )
        self._leases = leases
        self._on_change = on_change
        self._on_outcome = on_outcome
        self.runner = self._runner()
        self.outcomes: list[RoundOutcome] = []
        self.progress: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._pending: RoundPlan | None = None
        self.keep_lease = False  # set by run_now(hold=True): its group waits for the others
        self._lock = threading.Lock()
        self.note: str | None = None  # what the task is for, e.g. a search's trial
        self.fleet.subscribe()

    def _runner(self) -> RoundRunner:
        return RoundRunner(
            fleet=self.view,
            state=self.state,
            producer=self.producer,
            on_progress=self._on_progress,
            on_outcome=self._outcome,
        )

    def _outcome(self, outcome: RoundOutcome) -> None:
        if self._on_outcome is not None:
            self._on_outcome(self.name, outcome)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def round_open(self) -> bool:
        last = self.state.round(self.state.last_round_number())
        return last is not None and last.state == "announced"

    def needs(self, plan: RoundPlan) -> TaskNeeds:
        # The release names the trainers that can train it (a Keras model LiteRT cannot).
        release = self.runner.current_release()
        return TaskNeeds(
            task=self.name,
            labels=frozenset(self.task.spec.labels),
            min_samples=plan.config.min_samples,
            trainers=frozenset(release.trainers),
        )

    def prepare(self, plan: RoundPlan) -> None:
        """Publish the first release and take a share of the fleet; :meth:`launch` runs it."""
        with self._lock:
            if self.busy or self._pending is not None:
                raise FedgeError(f"task {self.name} is running rounds already", reason="busy")
            self.runner = self._runner()
            # In the caller's thread: the first release is built and published before any
            # other task's worker asks the producer lock for its own.
            self.runner.republish_current()
            self._leases.join(self.needs(plan))
            self._pending = plan

    def launch(self) -> None:
        with self._lock:
            plan, self._pending = self._pending, None
            if plan is None:
                return
            self._thread = threading.Thread(
                target=self._run, args=(plan,), name=f"task-{self.name}", daemon=True
            )
            self._thread.start()

    def start(self, plan: RoundPlan) -> None:
        self.prepare(plan)
        self.launch()

    def join(self, timeout_s: float | None = None) -> list[RoundOutcome]:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return list(self.outcomes)

    def stop(self, why: str | None = None) -> None:
        self.runner.request_stop(why)

    def _run(self, plan: RoundPlan) -> None:
        try:
            self.outcomes.extend(self.runner.run_plan(plan))
        except FedgeError as exc:
            logger.error("task %s: rounds stopped: %s", self.name, exc)  # noqa: TRY400
            self.fleet.report_error(exc.reason, f"task {self.name}: rounds stopped: {exc}")
        except Exception:
            logger.exception("task %s: rounds failed", self.name)
        finally:
            if not self.keep_lease:
                self._leases.leave(self.name)
            self.progress = {}
            if self._on_change is not None:
                self._on_change()

    def _on_progress(self, progress: dict[str, Any]) -> None:
        changed = progress != self.progress
        self.progress = progress
        if changed and self._on_change is not None:
            self._on_change()

    def status(self, agents: int) -> TaskProgress:
        done = [r for r in self.state.rounds() if r.state == "done"]
        accuracy = done[-1].metrics.get("accuracy") if done else None
        progress = self.progress if self.busy else {}
        left = f"{progress['seconds_left']:.0f} s left" if progress.get("seconds_left") else None
        return TaskProgress(
            state=Phase.ANNOUNCED if self.busy else Phase.IDLE,
            round=progress.get("round") or self.state.last_round_number() or None,
            model_version=self.state.get("current_version"),
            agents=agents,
            selected=progress.get("selected", 0),
            updates_received=progress.get("received", 0),
            accuracy=accuracy,
            detail="; ".join(d for d in (self.note, left) if d)[:1024] or None,
        )


class TaskRuns:
    """Every task the coordinator may run at once, and the leases of the fleet's agents."""

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        link: MqttLink,
        signing_key: SigningKey,
        registry: Fleet,
        on_change: Callable[[], None] | None = None,
        on_outcome: Callable[[str, RoundOutcome], None] | None = None,
    ) -> None:
        self._config = config
        self._on_outcome = on_outcome
        self._link = link
        self._key = signing_key
        self._registry = registry
        self._on_change = on_change
        self.leases = Leases(registry, default_budget=config.agent_budget)
        self._known = load_tasks(config.tasks)
        self._runs: dict[str, TaskRun] = {}
        self._lock = threading.Lock()
        self._stopped_at: dict[str, float] = {}  # task (or "*": all) -> when a stop came
        self._threads: list[threading.Thread] = []  # searches running
        self.closing = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._known)

    def add(self, name: str, task: LoadedTask, path: Path | None = None) -> None:
        """A task known from now on (a search adds its trials this way)."""
        with self._lock:
            self._known.setdefault(name, (task, path))

    def run(self, name: str) -> TaskRun:
        with self._lock:
            if name not in self._known:
                known = ", ".join(self._known) or "none (set the coordinator's tasks)"
                raise FedgeError(f"no task {name!r}; tasks: {known}", reason="unknown_task")
            if name not in self._runs:
                task, path = self._known[name]
                # A task file's own batch size, as a single-task coordinator uses it.
                config = self._config.model_copy(update={"task": path})
                self._runs[name] = TaskRun(
                    name=name,
                    task=task,
                    config=config,
                    link=self._link,
                    signing_key=self._key,
                    registry=self._registry,
                    leases=self.leases,
                    on_change=self._on_change,
                    on_outcome=self._on_outcome,
                )
            return self._runs[name]

    def defaults(self, name: str) -> dict[str, Any]:
        task, path = self._known[name]
        return task_defaults(task) if path is not None else {}

    def start(self, name: str, plan: RoundPlan) -> TaskRun:
        run = self.run(name)
        run.start(plan)
        return run

    def run_now(
        self, plans: Mapping[str, RoundPlan], *, hold: bool = False
    ) -> dict[str, list[RoundOutcome]]:
        """Run several tasks' plans at once, in their own threads; each one's new outcomes.

        Every task takes its share of the fleet before any selects, so the first to start
        does not take every agent for its first round. With ``hold``, a task that finishes
        first keeps its share until all have finished, so every group stays the same size
        from the first round to the last (a search's rung compares like with like).
        """
        started = time.monotonic()
        runs = {name: self.run(name) for name in plans}
        before = {name: len(run.outcomes) for name, run in runs.items()}
        for name, run in runs.items():
            run.keep_lease = hold
            run.prepare(plans[name])
            if self.stopped_since(name, started):  # a stop while it was being prepared
                run.stop("stopped before its first round")
        for run in runs.values():
            run.launch()
        try:
            return {name: run.join()[before[name] :] for name, run in runs.items()}
        finally:
            for name, run in runs.items():
                run.keep_lease = False
                if not run.busy:
                    self.leases.leave(name)

    def task(self, name: str) -> tuple[LoadedTask, Path | None]:
        with self._lock:
            if name not in self._known:
                raise FedgeError(f"no task {name!r}", reason="unknown_task")
            return self._known[name]

    def able_agents(self, name: str) -> int:
        """Agents that could train ``name`` now, whatever other tasks hold."""
        loaded, _ = self.task(name)
        needs = TaskNeeds(task=name, labels=frozenset(loaded.spec.labels))
        return sum(1 for a in self._registry.agents().values() if able_for(needs, a))

    @property
    def busy(self) -> bool:
        with self._lock:
            searching = any(thread.is_alive() for thread in self._threads)
            return searching or any(run.busy for run in self._runs.values())

    def track(self, thread: threading.Thread) -> None:
        """A search's thread: the tasks are busy while it lives; close() waits for it."""
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def stopped_since(self, name: str, since: float) -> bool:
        """A stop for ``name`` (its own, its search's task's, or everyone's) after ``since``."""
        with self._lock:
            return self.closing or any(
                at > since and (key in {"*", name} or name.startswith(f"{key}.t"))
                for key, at in self._stopped_at.items()
            )

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            task = self._config.topics.task_of(topic)
        except FedgeError:
            return
        with self._lock:
            run = self._runs.get(task or "")
        if run is not None:
            run.fleet.on_message(topic, payload)

    def statuses(self) -> dict[str, TaskProgress]:
        assignment = self.leases.assignment()
        with self._lock:
            runs = dict(self._runs)
        return {name: run.status(len(assignment.get(name, ()))) for name, run in runs.items()}

    def republish(self) -> None:
        """Every run's retained release and open announcement (a broker that forgot them)."""
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.fleet.forget_published()
            run.runner.republish_current()
            announcement = run.runner.open_announcement()
            if announcement is not None:
                run.fleet.announce(announcement)

    def stop(self, name: str | None = None, why: str | None = None) -> bool:
        """Stop one task's rounds and its search's trials (or all); True if any was running."""
        with self._lock:
            self._stopped_at[name or "*"] = time.monotonic()
            searching = any(
                t.is_alive() and (name is None or t.name == f"search-{name}") for t in self._threads
            )
            runs = [
                r
                for n, r in self._runs.items()
                if name is None or n == name or n.startswith(f"{name}.t")
            ]
        for run in runs:
            run.stop(why)
        return searching or any(run.busy for run in runs)

    def close(self, timeout_s: float = 30.0) -> None:
        self.closing = True
        self.stop(why="the coordinator stops")
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.join(max(0.0, deadline - time.monotonic()))
            run.state.close()
