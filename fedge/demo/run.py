"""The demo's story, told in order: broker, data, coordinator, agents, camera, rounds, report."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live

from fedge.control.interrupts import StopSignals
from fedge.demo.fleet import (
    Processes,
    free_port,
    start_agent,
    wait_for_agents,
    wait_for_port,
    wait_until_offline,
)
from fedge.demo.live import (
    DemoBroker,
    LiveView,
    initial_accuracy,
    plot_accuracy,
    results_watcher,
    stream_camera,
    summary_table,
    view,
)
from fedge.demo.settings import BROKER_PASSWORD, BROKER_USER, DemoSettings
from protocol.errors import ConfigError, FedgeError

logger = logging.getLogger(__name__)


def run_demo(
    settings: DemoSettings, console: Console, stops: StopSignals | None = None
) -> dict[str, Any]:
    """Run the demo; returns the report that is also written to ``workdir/report.json``.

    With ``stops`` (installed by the command), a first Ctrl-C makes the demo raise
    :class:`fedge.control.interrupts.Interrupted` at its next safe point, after which every process
    it started is stopped; a second one kills them all at once.
    """
    if settings.agents < 2:
        raise ConfigError("the demo needs at least 2 agents (one of them is cut off)")
    stops = stops if stops is not None else StopSignals()
    workdir = settings.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    processes = Processes(workdir / "logs")
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
    children: tuple[Processes, StopSignals],
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
        port = free_port()
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
        wait_for_port(port, children, "broker")
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
        start_agent(
            agent_id,
            workdir,
            processes,
            broker_url,
            (username, password),
            public_key=public_key,
            fleet=topics.fleet,
        )
    wait_for_agents(coordinator, settings.agents, children)
    console.print(
        f"[green]✓[/] {settings.agents} agents online (separate processes, "
        "LiteRT, no TensorFlow needed)"
    )
    # 5. camera and results
    live = LiveView()
    split = load_digits_split()
    broker = DemoBroker(broker_url, username, password)
    watcher = results_watcher(broker, topics, split.y_test, live)
    resources.append(watcher.stop)
    camera_stop = threading.Event()
    camera = threading.Thread(
        target=stream_camera,
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
        get_renderable=lambda: view(coordinator, live, settings),
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
                wait_until_offline(coordinator, dropped, stops)
                start_agent(
                    dropped,
                    workdir,
                    processes,
                    broker_url,
                    (username, password),
                    public_key=public_key,
                    fleet=topics.fleet,
                )
                wait_for_agents(coordinator, settings.agents, children)
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
        "initial_accuracy": initial_accuracy(coordinator),
        "live_inference": {
            version: float(np.mean(list(values)))
            for version, values in sorted(live.results_by_version.items())
            if values
        },
        "wall_seconds": time.monotonic() - started,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    plot_accuracy(report, workdir / "accuracy.png")
    console.print(summary_table(report))
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
