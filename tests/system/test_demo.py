"""`fedge demo`, as the README's first command runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.brokers import wait_until

pytestmark = [pytest.mark.system]

DEMO_TIMEOUT_S = 300


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


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedge",
            "demo",
            "--agents",
            "2",
            "--rounds",
            "50",
            "--workdir",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: (
                (workdir / "coordinator" / "coordinator.sqlite").exists()
                and len(_descendants_alive(process.pid)) >= 3
            ),
            DEMO_TIMEOUT_S,
            what="the demo's broker and agents running",
        )
        children = _descendants_alive(process.pid)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output.decode(errors="replace")[-3000:]
    assert b"Traceback" not in output
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"left running: {[p.cmdline() for p in alive]}"
    assert gone
