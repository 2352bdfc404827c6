"""One ``fedge agent run`` process, measured: start-up time, CPU time and resident memory.

Benchmarks run the agent the way users do, as its own process, so its costs are its own
and not shared with the benchmark's publisher and subscriber. Start-up is the time from
spawning the process to its retained ``online`` status reaching a subscriber (imports,
model load, connect). CPU and memory come from the kernel's accounting (psutil).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from fedge.harness.clients import disconnect, mqtt_client, subscribe
from fedge.harness.federation import agent_toml, no_tensorflow_path
from protocol.errors import MessageError
from protocol.messages.agent import AgentState, AgentStatus
from protocol.messages.codec import decode_message
from protocol.topics import Topics

__all__ = ["MeasuredAgent"]

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class MeasuredAgent:
    """``fedge agent run --config`` with ``settings``; TensorFlow blocked, as on a Pi."""

    def __init__(
        self, broker: Any, topics: Topics, settings: dict[str, Any], workdir: Path
    ) -> None:
        self._broker = broker
        self._topics = topics
        self.agent_id = str(settings["agent_id"])
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "agent.toml"
        self.config_path.write_text(agent_toml(settings))
        self.log_path = workdir / "agent.log"
        blocker = no_tensorflow_path(workdir / "no-tensorflow")
        self._env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(blocker), *(p for p in sys.path if p)]),
        }
        self._process: subprocess.Popen[bytes] | None = None
        self.startup_s = float("nan")

    def __enter__(self) -> MeasuredAgent:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def start(self) -> None:
        online = threading.Event()
        status_topic = self._topics.agent_status(self.agent_id)

        def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                status = decode_message(bytes(message.payload), AgentStatus)
            except MessageError:
                return
            if status.state is AgentState.ONLINE:
                online.set()

        watcher = mqtt_client(self._broker)
        watcher.on_message = on_message
        try:
            # Subscribed before the spawn, so an old retained status cannot be mistaken
            # for this process's: a fresh data directory never had one.
            subscribe(watcher, status_topic)
            with self.log_path.open("ab") as log:
                started = time.perf_counter()
                self._process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fedge",
                        "agent",
                        "run",
                        "--config",
                        str(self.config_path),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._env,
                )
            while not online.wait(0.1):
                if self._process.poll() is not None:
                    raise RuntimeError(f"agent exited:\n{self.log()[-3000:]}")
                if time.perf_counter() - started > START_TIMEOUT_S:
                    raise TimeoutError(f"agent not online after {START_TIMEOUT_S:g} s")
            self.startup_s = time.perf_counter() - started
        finally:
            disconnect(watcher)

    def cpu_s(self) -> float:
        """User plus system CPU time the process used so far (all its threads)."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def memory_bytes(self) -> dict[str, int]:
        """Resident memory now and at its peak (``VmHWM``)."""
        process = psutil.Process(self.pid)
        peak = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
        return {"rss": int(process.memory_info().rss), "peak_rss": peak}

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
