"""A federation for system tests and benchmarks: a coordinator and agent processes.

Agents are real ``fedge agent run`` processes with their own data directories, each holding
its share of the reference non-IID split imported into its sample store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from agent.store import SampleStore
from coordinator.config import load_coordinator_config
from coordinator.daemon import Coordinator
from coordinator.reference import write_agent_shares
from protocol.signing import write_key_pair
from protocol.topics import Topics

AGENTS_ONLINE_TIMEOUT_S = 120.0

_NO_TENSORFLOW = 'import sys\nsys.modules["tensorflow"] = None\n'


def no_tensorflow_path(root: Path) -> Path:
    """A directory whose sitecustomize makes ``import tensorflow`` fail, as on a Pi."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sitecustomize.py").write_text(_NO_TENSORFLOW)
    return root


@dataclass
class AgentProcess:
    agent_id: str
    config_path: Path
    data_dir: Path
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedge", "agent", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class CoordinatorProcess:
    """``fedge coordinator run`` as a separate process, so a test can SIGKILL it."""

    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedge",
                "coordinator",
                "run",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        log.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Federation:
    root: Path
    broker: Any
    topics: Topics
    agents: list[AgentProcess] = field(default_factory=list)
    coordinator: Coordinator | None = None
    key_paths: tuple[Path, Path] | None = None
    coordinator_process: CoordinatorProcess | None = None

    def coordinator_config(self, **extra: Any) -> dict[str, Any]:
        assert self.key_paths is not None
        settings: dict[str, Any] = {
            "broker_url": self.broker.url,
            "username": getattr(self.broker, "username", None),
            "password": getattr(self.broker, "password", None),
            "fleet": self.topics.fleet,
            "topic_root": self.topics.root,
            "data_dir": self.root / "coordinator",
            "signing_key": self.key_paths[0],
            "status_interval_s": 3600.0,
        }
        settings |= extra
        return {k: v for k, v in settings.items() if v is not None}

    def start_coordinator(self, **extra: Any) -> Coordinator:
        self.coordinator = Coordinator(load_coordinator_config(**self.coordinator_config(**extra)))
        self.coordinator.start()
        return self.coordinator

    def start_coordinator_process(self, **extra: Any) -> CoordinatorProcess:
        """The coordinator as ``fedge coordinator run --config <root>/coordinator.toml``."""
        config_path = self.root / "coordinator.toml"
        config_path.write_text(agent_toml(self.coordinator_config(**extra)))
        self.coordinator_process = CoordinatorProcess(config_path, self.root / "coordinator.log")
        self.coordinator_process.start()
        return self.coordinator_process

    def wait_for_agents(self, count: int, timeout_s: float = AGENTS_ONLINE_TIMEOUT_S) -> None:
        assert self.coordinator is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            able = [a for a in self.coordinator.fleet.agents().values() if a.online and a.can_train]
            if len(able) >= count:
                return
            for agent in self.agents:
                if agent.process is not None and agent.process.poll() is not None:
                    raise AssertionError(f"agent {agent.agent_id} exited:\n{agent.log()[-3000:]}")
            time.sleep(0.1)  # polling a registry that the network thread fills
        raise AssertionError(f"fewer than {count} agents online after {timeout_s} s")

    def stop(self) -> None:
        # All asked at once, then waited for: one by one, 200 agents took minutes to stop.
        for agent in self.agents:
            if agent.process is not None and agent.process.poll() is None:
                agent.process.terminate()
        for agent in self.agents:
            agent.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.coordinator_process is not None:
            self.coordinator_process.stop()


def agent_toml(settings: dict[str, Any]) -> str:
    """A config file's text; None is left out (TOML has no null) and paths become strings."""
    return tomli_w.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in settings.items() if v is not None}
    )


@contextmanager
def federation(
    root: Path,
    broker: Any,
    topics: Topics,
    *,
    num_agents: int,
    trainer: str = "litert",
    block_tensorflow: bool = True,
    per_agent: Mapping[str, Mapping[str, Any]] | None = None,
    shares: Sequence[Path] | None = None,
    tensorflow_agents: Collection[str] = (),
    **agent_extra: Any,
) -> Iterator[Federation]:
    """Keys, data shares, agent processes; the caller starts the coordinator.

    ``per_agent`` maps an agent id (``agent-00``, ...) to settings for that agent only,
    such as its own broker ``username`` and ``password``; they win over ``agent_extra``.
    The agents named in ``tensorflow_agents`` can import TensorFlow even when it is blocked.
    """
    fed = Federation(root=root, broker=broker, topics=topics)
    fed.key_paths = write_key_pair(root / "keys")
    if shares is None:  # the reference workload's digits
        shares = write_agent_shares(root / "shares", num_agents)
    with_tensorflow = dict(os.environ)
    env = dict(os.environ)
    if block_tensorflow:
        blocker = no_tensorflow_path(root / "no-tensorflow")
        env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")])
    for index, share in enumerate(shares):
        agent_id = f"agent-{index:02d}"
        data_dir = root / agent_id
        store = SampleStore(data_dir / "samples")
        try:
            store.import_folder(share)
        finally:
            store.close()
        settings: dict[str, Any] = {
            "broker_url": broker.url,
            "agent_id": agent_id,
            "fleet": topics.fleet,
            "topic_root": topics.root,
            "data_dir": data_dir,
            "coordinator_key": fed.key_paths[1],
            "trainer": trainer,
            "status_interval_s": 3600.0,
        }
        for key in ("username", "password"):
            if getattr(broker, key, None):
                settings[key] = getattr(broker, key)
        settings |= agent_extra
        settings |= (per_agent or {}).get(agent_id, {})
        config_path = data_dir / "agent.toml"
        config_path.write_text(agent_toml(settings))
        fed.agents.append(
            AgentProcess(
                agent_id,
                config_path,
                data_dir,
                with_tensorflow if agent_id in tensorflow_agents else env,
                root / f"{agent_id}.log",
            )
        )
    try:
        for agent in fed.agents:
            agent.start()
        yield fed
    finally:
        fed.stop()
