"""Ctrl-C on every long-running command: status 130, no traceback; a second one at once.

(`fedge demo` has its own tests in test_demo.py, at every phase of its life.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.topics import Topics
from tests.agent.agent_helpers import held_out_digits
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    disconnect,
    free_port,
    mqtt_client,
    subscribe,
    wait_until,
)

pytestmark = [pytest.mark.system]

READY_TIMEOUT_S = 180.0
EXIT_TIMEOUT_S = 60.0
INTERRUPTED = 130


class _Command:
    """``fedge ARGS...`` as its own process, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedge", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "120", **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str) -> None:
        def printed() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"exited before printing {text!r}:\n{self.output()}")
            return text in self.output()

        wait_until(printed, READY_TIMEOUT_S, what=f"{text!r} in the output")

    def interrupt(self, times: int = 1) -> int:
        for _ in range(times):
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(EXIT_TIMEOUT_S)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def commands() -> Iterator[list[_Command]]:
    started: list[_Command] = []
    yield started
    for command in started:
        command.close()


def _start(commands: list[_Command], *args: str) -> _Command:
    command = _Command(list(args))
    commands.append(command)
    return command


def _assert_interrupted(command: _Command, status: int) -> None:
    assert status == INTERRUPTED, command.output()[-3000:]
    assert "Traceback" not in command.output(), command.output()[-3000:]


def _agent_args(mosquitto: MosquittoProcess, root: str, data_dir: Path) -> list[str]:
    return [
        "agent",
        "run",
        "--broker",
        mosquitto.url,
        "--fleet",
        root,
        "--agent-id",
        "pi-ctrl-c",
        "--data-dir",
        str(data_dir),
    ]


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_agent_run(
    mosquitto: MosquittoProcess,
    unique_root: str,
    tmp_path: Path,
    commands: list[_Command],
    times: int,
) -> None:
    agent = _start(commands, *_agent_args(mosquitto, unique_root, tmp_path / "agent"))
    agent.wait_for_line("serving")
    _assert_interrupted(agent, agent.interrupt(times))
    if times == 1:
        assert "agent stopped" in agent.output()  # the clean shutdown ran


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_coordinator_run(
    mosquitto: MosquittoProcess,
    unique_root: str,
    tmp_path: Path,
    commands: list[_Command],
    times: int,
) -> None:
    coordinator = _start(
        commands,
        "coordinator",
        "run",
        "--broker",
        mosquitto.url,
        "--fleet",
        unique_root,
        "--data-dir",
        str(tmp_path / "coordinator"),
    )
    coordinator.wait_for_line("agents need")
    _assert_interrupted(coordinator, coordinator.interrupt(times))
    if times == 1:
        assert "coordinator stopped" in coordinator.output()


def test_coordinator_run_while_building_its_model(
    mosquitto: MosquittoProcess, unique_root: str, tmp_path: Path, commands: list[_Command]
) -> None:
    coordinator = _start(
        commands,
        "coordinator",
        "run",
        "--broker",
        mosquitto.url,
        "--fleet",
        unique_root,
        "--data-dir",
        str(tmp_path / "coordinator"),
    )
    coordinator.wait_for_line("coordinator starting")
    _assert_interrupted(coordinator, coordinator.interrupt())


def test_round_status_watch(
    mosquitto: MosquittoProcess, unique_root: str, tmp_path: Path, commands: list[_Command]
) -> None:
    coordinator = _start(
        commands,
        "coordinator",
        "run",
        "--broker",
        mosquitto.url,
        "--fleet",
        unique_root,
        "--data-dir",
        str(tmp_path / "coordinator"),
    )
    coordinator.wait_for_line("agents need")
    watch = _start(
        commands, "round", "status", "--broker", mosquitto.url, "--fleet", unique_root, "--watch"
    )
    watch.wait_for_line("idle")
    _assert_interrupted(watch, watch.interrupt())


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_camera(
    mosquitto: MosquittoProcess,
    unique_root: str,
    tmp_path: Path,
    commands: list[_Command],
    times: int,
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    images, _ = held_out_digits(3)
    for index, image in enumerate(images):
        (folder / f"{index}.png").write_bytes(image)
    frames_topic = Topics(fleet=unique_root).camera_frames("ctrl-c")
    collector = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=collector)
    try:
        subscribe(watcher, frames_topic)
        camera = _start(
            commands,
            "camera",
            str(folder),
            "--broker",
            mosquitto.url,
            "--fleet",
            unique_root,
            "--camera",
            "ctrl-c",
            "--fps",
            "5",
            "--loop",
        )
        collector.wait_for_topic(frames_topic, 2, READY_TIMEOUT_S)
        _assert_interrupted(camera, camera.interrupt(times))
    finally:
        disconnect(watcher)


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_broker(commands: list[_Command], times: int) -> None:
    port = free_port()
    broker = _start(commands, "broker", "--port", str(port))
    broker.wait_for_line("Ctrl-C stops it")
    wait_until(lambda: _accepts(port), READY_TIMEOUT_S, what="the broker's port")
    _assert_interrupted(broker, broker.interrupt(times))


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        time.sleep(0.05)
        return False


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_dashboard(
    mosquitto: MosquittoProcess, unique_root: str, commands: list[_Command], times: int
) -> None:
    port = free_port()
    dashboard = _start(
        commands,
        "dashboard",
        "--broker",
        mosquitto.url,
        "--fleet",
        unique_root,
        "--port",
        str(port),
    )
    wait_until(lambda: _accepts(port), READY_TIMEOUT_S, what="the dashboard's port")
    _assert_interrupted(dashboard, dashboard.interrupt(times))
