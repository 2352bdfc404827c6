"""The demo's processes (broker, agents) and the waits on them, all stoppable by Ctrl-C."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedge.control.interrupts import StopSignals
from fedge.demo.settings import START_TIMEOUT_S
from protocol.errors import TransportError

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Every child process of the demo, ended together whatever happens.

    Children run in sessions of their own, so a terminal's Ctrl-C reaches only the demo,
    which stops them in order. The demo's signal handler never raises (see
    ``fedge.control.interrupts``), so a child is always in ``children`` once ``Popen`` returned.
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


def start_agent(
    agent_id: str,
    workdir: Path,
    processes: Processes,
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


def wait_for_port(port: int, children: tuple[Processes, StopSignals], name: str) -> None:
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


def wait_until_offline(coordinator: Any, agent: str, stops: StopSignals) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        stops.check()
        info = coordinator.fleet.agents().get(agent)
        if info is None or not info.online:
            return
        stops.wait(0.1)
    raise TransportError(f"the broker never reported {agent} offline")


def wait_for_agents(coordinator: Any, count: int, children: tuple[Processes, StopSignals]) -> None:
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
