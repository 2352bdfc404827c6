"""``fedge demo``: a whole fleet on one machine, in about a minute.

An embedded broker (or ``--broker``), a coordinator, N agents as separate processes (each
with its own non-IID share of the digits as labelled samples), and a camera streaming
unlabelled digits. Agents serve live inference with whatever model the fleet has, while
federated rounds improve it; mid-demo one agent is cut off and comes back, and the rounds
go on. It ends with a summary table, a plot of accuracy per round (PNG) and a JSON report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from fedge.interrupts import StopSignals
from protocol.errors import ConfigError, FedgeError, TransportError

__all__ = ["DemoSettings", "run_demo"]

logger = logging.getLogger(__name__)

BROKER_USER = "fedge"
BROKER_PASSWORD = "fedge-demo"  # noqa: S105 - a local throwaway broker's password
CAMERA_ID = "demo-cam"
START_TIMEOUT_S = 120.0
LIVE_WINDOW_FRAMES = 40


@dataclass(frozen=True, slots=True)
class DemoSettings:
    agents: int = 4
    rounds: int = 10
    deadline_s: float = 8.0
    fps: float = 4.0
    broker_url: str | None = None
    workdir: Path = Path("fedge-demo")
    drop_agent: bool = True


@dataclass
class _Live:
    """What the live view shows; written by callbacks, read by the render loop."""

    results_by_version: dict[str, deque[bool]] = field(
        default_factory=lambda: defaultdict(lambda: deque(maxlen=LIVE_WINDOW_FRAMES))
    )
    frames_sent: int = 0
    events: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, text: str) -> None:
        with self.lock:
            self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
            del self.events[:-6]


@dataclass(frozen=True, slots=True)
class _Broker:
    url: str
    username: str | None
    password: str | None

    def address(self) -> Any:
        from runtime.mqtt import parse_broker_url

        return parse_broker_url(self.url, username=self.username, password=self.password)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Processes:
    """Every child process of the demo, ended together whatever happens.

    Children run in sessions of their own, so a terminal's Ctrl-C reaches only the demo,
    which stops them in order. The demo's signal handler never raises (see
    ``fedge.interrupts``), so a child is always in ``children`` once ``Popen`` returned.
    """

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._all: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with (self._logs / f"{name}.log").open("ab") as log:
            child = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._all.append(child)
        self.children[name] = child

    def signal(self, name: str, signum: int) -> None:
        child = self.children.get(name)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def kill(self, name: str) -> None:
        child = self.children.get(name)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait(10)

    def stop_all(self) -> None:
        for child in self._all:
            if child.poll() is None:
                # A frozen (SIGSTOPped) child acts on SIGTERM only once it runs again.
                child.send_signal(signal.SIGCONT)
                child.terminate()
        deadline = time.monotonic() + 15
        for child in self._all:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)

    def kill_all(self) -> None:
        """SIGKILL to every child still running: the second Ctrl-C, which cannot wait."""
        for child in self._all:
            if child.poll() is None:
                child.kill()


def run_demo(
    settings: DemoSettings, console: Console, stops: StopSignals | None = None
) -> dict[str, Any]:
    """Run the demo; returns the report that is also written to ``workdir/report.json``.

    With ``stops`` (installed by the command), a first Ctrl-C makes the demo raise
    :class:`fedge.interrupts.Interrupted` at its next safe point, after which every process
    it started is stopped; a second one kills them all at once.
    """
    if settings.agents < 2:
        raise ConfigError("the demo needs at least 2 agents (one of them is cut off)")
    stops = stops if stops is not None else StopSignals()
    workdir = settings.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    processes = _Processes(workdir / "logs")
    stops.on_force(processes.kill_all)
    resources: list[Any] = []
    try:
        return _run(settings, console, workdir, (processes, stops), resources)
    finally:
        for resource in reversed(resources):
            try:
                resource()
            except FedgeError as exc:
                logger.warning("shutdown step failed: %s", exc)
        processes.stop_all()


def _run(  # noqa: PLR0915 - one linear story, told in order
    settings: DemoSettings,
    console: Console,
    workdir: Path,
    children: tuple[_Processes, StopSignals],
    resources: list[Any],
) -> dict[str, Any]:
    from agent.store import SampleStore
    from coordinator.config import load_coordinator_config
    from coordinator.daemon import Coordinator
    from coordinator.reference import load_digits_split, write_agent_shares
    from protocol.signing import write_key_pair
    from protocol.topics import Topics

    processes, stops = children
    started = time.monotonic()
    topics = Topics(fleet="demo")
    # 1. broker
    if settings.broker_url is None:
        port = _free_port()
        broker_url = f"mqtt://127.0.0.1:{port}"
        env = dict(os.environ, FEDGE_BROKER_PASSWORD=BROKER_PASSWORD)
        processes.start(
            "broker",
            [
                sys.executable,
                "-m",
                "runtime.broker",
                "--port",
                str(port),
                "--username",
                BROKER_USER,
            ],
            env,
        )
        _wait_for_port(port, children, "broker")
        username, password = BROKER_USER, BROKER_PASSWORD
        console.print(f"[green]✓[/] embedded broker on {broker_url}")
    else:
        broker_url, username, password = settings.broker_url, None, None
        console.print(f"[green]✓[/] using broker {broker_url}")
    # 2. keys and data
    stops.check()
    private_key, public_key = write_key_pair(workdir / "keys")
    shares = write_agent_shares(workdir / "shares", settings.agents)
    agent_ids = [f"agent-{i}" for i in range(settings.agents)]
    for agent_id, share in zip(agent_ids, shares, strict=True):
        store = SampleStore(workdir / agent_id / "samples")
        try:
            imported = store.import_folder(share)
        finally:
            store.close()
        console.print(
            f"[green]✓[/] {agent_id}: {imported.added} labelled digits in its store "
            "(its own non-IID share)"
        )
        stops.check()
    # 3. coordinator
    console.print("  building the model and its trainable LiteRT twin...")
    coordinator = Coordinator(
        load_coordinator_config(
            broker_url=broker_url,
            username=username,
            password=password,
            fleet=topics.fleet,
            data_dir=workdir / "coordinator",
            signing_key=private_key,
            status_interval_s=3600.0,
        )
    )
    resources.append(coordinator.stop)

    def stop_rounds() -> None:
        # The runner in charge when the signal comes: a Ctrl-C during a round ends the
        # round's wait at its next poll, not at its deadline.
        coordinator.runner.request_stop()

    stops.on_stop(stop_rounds)
    stops.check()
    coordinator.start()
    console.print("[green]✓[/] coordinator up, model r0 published (untrained)")
    # 4. agents
    for agent_id in agent_ids:
        _start_agent(
            agent_id,
            workdir,
            processes,
            broker_url,
            (username, password),
            public_key=public_key,
            fleet=topics.fleet,
        )
    _wait_for_agents(coordinator, settings.agents, children)
    console.print(
        f"[green]✓[/] {settings.agents} agents online (separate processes, "
        "LiteRT, no TensorFlow needed)"
    )
    # 5. camera and results
    live = _Live()
    split = load_digits_split()
    broker = _Broker(broker_url, username, password)
    watcher = _results_watcher(broker, topics, split.y_test, live)
    resources.append(watcher.stop)
    camera_stop = threading.Event()
    camera = threading.Thread(
        target=_stream_camera,
        args=(broker, topics, split.x_test, (camera_stop, live), settings.fps),
        name="demo-camera",
        daemon=True,
    )
    camera.start()
    stops.check()

    def stop_camera() -> None:
        camera_stop.set()
        camera.join(10)

    resources.append(stop_camera)
    # 6. rounds; mid-demo one agent freezes (as on a dead Wi-Fi link), then comes back
    dropped = agent_ids[-1]
    phases = _phases(settings)
    with Live(
        get_renderable=lambda: _view(coordinator, live, settings),
        console=console,
        refresh_per_second=4,
    ):
        for phase, phase_rounds in phases:
            stops.check()
            if phase == "freeze":
                processes.signal(dropped, signal.SIGSTOP)
                live.note(f"{dropped} cut off: frozen, its link silent, while still selected")
            coordinator.run_plan_now(_plan(settings, phase_rounds))
            stops.check()
            if phase == "freeze":
                processes.kill(dropped)
                # Its last will must be seen first, or the old "online" could be taken for
                # the new process's and the next round announced before it is back.
                _wait_until_offline(coordinator, dropped, stops)
                _start_agent(
                    dropped,
                    workdir,
                    processes,
                    broker_url,
                    (username, password),
                    public_key=public_key,
                    fleet=topics.fleet,
                )
                _wait_for_agents(coordinator, settings.agents, children)
                live.note(f"{dropped} restarted and back online: it joins the next rounds")
    console.print()
    drop_round = _drop_round(settings)
    camera_stop.set()
    # 7. report
    rounds = list(coordinator.state.rounds())
    report = {
        "agents": settings.agents,
        "rounds": [
            {
                "round": r.round,
                "state": r.state,
                "selected": len(r.selected),
                "updates": r.metrics.get("updates"),
                "accuracy": r.metrics.get("accuracy"),
                "bytes_up": r.metrics.get("bytes_up"),
                "seconds": r.metrics.get("seconds"),
                "reason": r.reason,
            }
            for r in rounds
        ],
        "dropped_agent": dropped if drop_round else None,
        "dropped_in_round": drop_round,
        "initial_accuracy": _initial_accuracy(coordinator),
        "live_inference": {
            version: float(np.mean(list(values)))
            for version, values in sorted(live.results_by_version.items())
            if values
        },
        "wall_seconds": time.monotonic() - started,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    _plot(report, workdir / "accuracy.png")
    console.print(_summary(report))
    console.print(
        f"report: {workdir / 'report.json'}; plot: {workdir / 'accuracy.png'}; "
        f"logs: {workdir / 'logs'}"
    )
    return report


def _drop_round(settings: DemoSettings) -> int | None:
    return 3 if settings.drop_agent and settings.rounds >= 4 else None


def _phases(settings: DemoSettings) -> list[tuple[str, int]]:
    """Rounds before the fault, the round the fault hits, and the rounds after it."""
    drop = _drop_round(settings)
    if drop is None:
        return [("normal", settings.rounds)]
    return [("normal", drop - 1), ("freeze", 1), ("normal", settings.rounds - drop)]


def _plan(settings: DemoSettings, rounds: int) -> Any:
    from coordinator.rounds import RoundPlan
    from protocol.messages.rounds import RoundConfig, UpdateEncoding

    return RoundPlan(
        rounds=rounds,
        min_agents=settings.agents - 1,
        deadline_s=settings.deadline_s,
        config=RoundConfig(update_encoding=UpdateEncoding.INT8),
    )


def _start_agent(
    agent_id: str,
    workdir: Path,
    processes: _Processes,
    broker_url: str,
    credentials: tuple[str | None, str | None],
    *,
    public_key: Path,
    fleet: str,
) -> None:
    from runtime.settings import write_toml

    config = workdir / agent_id / "agent.toml"
    username, password = credentials
    write_toml(
        config,
        {
            "broker_url": broker_url,
            "username": username,
            "password": password,
            "agent_id": agent_id,
            "fleet": fleet,
            "data_dir": str(workdir / agent_id),
            "coordinator_key": str(public_key),
            "trainer": "litert",
            "status_interval_s": 2.0,
            "max_fps": 20.0,
        },
    )
    processes.start(
        agent_id, [sys.executable, "-m", "fedge", "agent", "run", "--config", str(config)]
    )


def _wait_for_port(port: int, children: tuple[_Processes, StopSignals], name: str) -> None:
    processes, stops = children
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        stops.check()
        if processes.children[name].poll() is not None:
            raise TransportError(f"the {name} exited at start; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            stops.wait(0.1)
    raise TransportError(f"the {name} did not open port {port}")


def _wait_until_offline(coordinator: Any, agent: str, stops: StopSignals) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        stops.check()
        info = coordinator.fleet.agents().get(agent)
        if info is None or not info.online:
            return
        stops.wait(0.1)
    raise TransportError(f"the broker never reported {agent} offline")


def _wait_for_agents(
    coordinator: Any, count: int, children: tuple[_Processes, StopSignals]
) -> None:
    processes, stops = children
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        stops.check()
        able = [a for a in coordinator.fleet.agents().values() if a.online and a.can_train]
        if len(able) >= count:
            return
        dead = [n for n, p in processes.children.items() if p.poll() is not None]
        if dead:
            raise TransportError(f"{', '.join(dead)} exited at start; see fedge-demo/logs")
        stops.wait(0.2)
    raise TransportError(f"only some of {count} agents came online in {START_TIMEOUT_S:g} s")


def _results_watcher(broker: _Broker, topics: Any, truth: np.ndarray, live: _Live) -> Any:
    from protocol.messages.agent import InferenceResult
    from protocol.messages.codec import decode_message
    from runtime.mqtt import MqttLink

    def on_message(_topic: str, payload: bytes) -> None:
        try:
            result = decode_message(payload, InferenceResult)
        except FedgeError:
            return
        index = int(result.frame_id.rsplit("-", 1)[-1]) % len(truth)
        if result.predictions:
            correct = result.predictions[0].label == str(int(truth[index]))
            with live.lock:
                live.results_by_version[result.model_version].append(correct)

    link = MqttLink(
        broker.address(),
        client_id="fedge-demo-watcher",
        clean_session=True,
        on_message=on_message,
    )
    link.subscribe(topics.all_agent_results(), qos=0)
    link.start()
    link.wait_connected(30.0)
    return link


def _stream_camera(
    broker: _Broker,
    topics: Any,
    images: np.ndarray,
    control: tuple[threading.Event, _Live],
    fps: float,
) -> None:
    from coordinator.reference import digit_images_uint8, digit_png
    from protocol.frames import FrameMeta, encode_envelope
    from runtime.mqtt import MqttLink

    stop, live = control
    link = MqttLink(
        broker.address(),
        client_id="fedge-demo-camera",
        clean_session=True,
    )
    link.start()
    try:
        link.wait_connected(30.0)
        frames = digit_images_uint8(images)
        sequence = 0
        while not stop.wait(1.0 / fps):
            index = sequence % len(frames)
            payload = encode_envelope(
                digit_png(frames[index]),
                FrameMeta(frame_id=f"{CAMERA_ID}-{index}", timestamp=time.time()),
            )
            link.publish(topics.camera_frames(CAMERA_ID), payload, qos=0)
            sequence += 1
            live.frames_sent = sequence
    except FedgeError as exc:
        live.note(f"camera stopped: {exc}")
    finally:
        link.stop()


def _view(coordinator: Any, live: _Live, settings: DemoSettings) -> Group:
    table = Table(title="federated rounds", expand=False)
    for column in ("round", "state", "selected", "updates", "accuracy", "kB up", "seconds"):
        table.add_column(column, justify="right")
    for record in coordinator.state.rounds():
        metrics = record.metrics
        accuracy = metrics.get("accuracy")
        table.add_row(
            str(record.round),
            record.state if not record.reason else "failed",
            str(len(record.selected)),
            str(metrics.get("updates", "…")),
            f"{accuracy:.3f}" if accuracy is not None else "…",
            f"{metrics.get('bytes_up', 0) / 1000:.1f}" if metrics else "…",
            f"{metrics.get('seconds', 0):.1f}" if metrics else "…",
        )
    online = sum(1 for a in coordinator.fleet.agents().values() if a.online)
    with live.lock:
        inference = ", ".join(
            f"{version}: {100 * float(np.mean(list(v))):.0f}%"
            for version, v in sorted(live.results_by_version.items())[-3:]
            if v
        )
        events = list(live.events)
    lines = [
        f"agents online: {online}/{settings.agents}   camera frames sent: {live.frames_sent}",
        f"live inference accuracy by model (last {LIVE_WINDOW_FRAMES} results): "
        f"{inference or 'waiting for results'}",
        *events,
    ]
    return Group(table, *lines)


def _initial_accuracy(coordinator: Any) -> float | None:
    from protocol.messages.rounds import ModelRelease

    text = coordinator.state.release_json("r0")
    if text is None:
        return None
    metrics = ModelRelease.model_validate_json(text).metrics
    return metrics.accuracy if metrics else None


def _summary(report: dict[str, Any]) -> Table:
    table = Table(title="fedge demo: summary")
    for column in ("round", "selected", "updates", "accuracy", "kB up", "seconds", "note"):
        table.add_column(column, justify="right")
    table.add_row(
        "0", "-", "-", f"{report['initial_accuracy'] or 0:.3f}", "-", "-", "untrained model"
    )
    for entry in report["rounds"]:
        note = ""
        if entry["round"] == report["dropped_in_round"]:
            note = f"{report['dropped_agent']} frozen; closed at the deadline by quorum"
        if entry["reason"]:
            note = entry["reason"]
        accuracy = entry["accuracy"]
        table.add_row(
            str(entry["round"]),
            str(entry["selected"]),
            str(entry["updates"] or 0),
            f"{accuracy:.3f}" if accuracy is not None else "-",
            f"{(entry['bytes_up'] or 0) / 1000:.1f}",
            f"{entry['seconds'] or 0:.1f}",
            note,
        )
    return table


def _plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy per round as a PNG (matplotlib), the initial model as round 0."""
    from coordinator.figures import accuracy_figure, save_png

    rounds = [0, *(e["round"] for e in report["rounds"])]
    accuracy = [report["initial_accuracy"], *(e["accuracy"] for e in report["rounds"])]
    cut = report["dropped_in_round"]
    figure = accuracy_figure(
        rounds,
        accuracy,
        title="fedge demo: global model accuracy per round",
        marks={cut: f"{report['dropped_agent']} cut off"} if cut else None,
    )
    save_png(figure, path)
