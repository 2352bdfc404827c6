"""`fedge demo`, as the README's first command runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.brokers import wait_until

pytestmark = [pytest.mark.system]

DEMO_TIMEOUT_S = 300
CTRL_C_TIMEOUT_S = 90


def _descendants_alive(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def test_demo_runs_to_completion_with_an_agent_cut_off_and_back(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "demo",
            "--agents",
            "3",
            "--rounds",
            "5",
            "--deadline",
            "5",
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
        env=dict(os.environ, COLUMNS="120"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads((workdir / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["state"] for r in rounds] == ["done"] * 5
    dropped = report["dropped_in_round"]
    assert rounds[dropped - 1]["selected"] == 3
    assert rounds[dropped - 1]["updates"] == 2  # closed by quorum without the frozen agent
    assert rounds[-1]["updates"] == 3  # the agent came back and takes part again
    assert rounds[-1]["accuracy"] > report["initial_accuracy"] + 0.2
    assert (workdir / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert report["live_inference"], "the camera's frames were served"
    assert "summary" in result.stdout


class _Demo:
    """A ``fedge demo`` process whose output lines are collected as they come."""

    def __init__(self, workdir: Path, *, rounds: int = 50) -> None:
        self.workdir = workdir
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedge",
                "demo",
                "--agents",
                "2",
                "--rounds",
                str(rounds),
                "--deadline",
                "5",
                "--workdir",
                str(workdir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, COLUMNS="120"),
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

    def printed(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def rounds_done(self) -> int:
        database = self.workdir / "coordinator" / "coordinator.sqlite"
        if not database.exists():
            return 0
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1.0)
            ) as db:
                (count,) = db.execute("SELECT COUNT(*) FROM rounds WHERE state = 'done'").fetchone()
        except sqlite3.Error:
            return 0
        return int(count)

    def descendants(self) -> list[psutil.Process]:
        return _descendants_alive(self.process.pid)

    def finish(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._reader.join(10)
            if self.process.stdout is not None:
                self.process.stdout.close()


# Points of the demo's life at which a Ctrl-C must stop it: each is an observable state.
_PHASES: dict[str, Callable[[_Demo], bool]] = {
    # The broker process exists but the demo has not said so: it must still be stopped.
    "broker just spawned": lambda demo: len(demo.descendants()) >= 1,
    "importing samples": lambda demo: demo.printed("embedded broker on"),
    "building the model": lambda demo: demo.printed("building the model"),
    "agents starting": lambda demo: demo.printed("coordinator up"),
    "first rounds": lambda demo: demo.printed("agents online"),
    "agent frozen in round 3": lambda demo: demo.rounds_done() >= 2,
    "later rounds": lambda demo: demo.rounds_done() >= 5,
}


@pytest.mark.parametrize("phase", list(_PHASES))
def test_demo_stops_cleanly_on_ctrl_c_at_every_phase(tmp_path: Path, phase: str) -> None:
    demo = _Demo(tmp_path / "demo")
    try:
        wait_until(lambda: _PHASES[phase](demo), DEMO_TIMEOUT_S, what=f"the demo at {phase!r}")
        children = demo.descendants()
        demo.process.send_signal(signal.SIGINT)
        status = demo.finish(CTRL_C_TIMEOUT_S)
    finally:
        demo.finish(10)
    output = demo.output()
    assert status == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "interrupted" in output
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"left running: {[p.cmdline() for p in alive]}"
    assert len(gone) == len(children)


def test_a_second_ctrl_c_stops_the_demo_at_once(tmp_path: Path) -> None:
    demo = _Demo(tmp_path / "demo")
    try:
        wait_until(lambda: demo.rounds_done() >= 1, DEMO_TIMEOUT_S, what="the demo's rounds")
        children = demo.descendants()
        demo.process.send_signal(signal.SIGINT)
        demo.process.send_signal(signal.SIGINT)
        status = demo.finish(CTRL_C_TIMEOUT_S)
    finally:
        demo.finish(10)
    assert status == 130, demo.output()[-3000:]
    assert "Traceback" not in demo.output()
    _gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"left running: {[p.cmdline() for p in alive]}"
