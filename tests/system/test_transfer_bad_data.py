"""Bad tasks and bad data for a transfer task, through a real Mosquitto and real processes.

Each mistake gives one clear line (a coordinator that refuses to start) or an error event
with a reason (an agent that sits a round out), and nothing else stops: the agents stay up
and the next good coordinator, or the other agents, train on.

The backbone is the reference digits model (8x8 grey in, 10 outputs used as features): the
mistakes are about shapes and labels, not accuracy, so a backbone that needs no
pretraining keeps these tests fast.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from coordinator.tflite_export import ReferenceModels
from fedge.harness.federation import AgentProcess, Federation, agent_toml, federation
from protocol.errors import FedgeError
from protocol.messages.agent import ErrorEvent
from protocol.messages.codec import decode_message
from protocol.messages.rounds import RoundConfig
from protocol.topics import Topics
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    subscribe,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]

AGENTS = 3
LABELS = ("0", "1", "2", "3", "4")
REFUSAL_TIMEOUT_S = 120.0
EVENT_TIMEOUT_S = 60.0
SIT_OUT_DEADLINE_S = 8.0


def _task(
    backbone: str, *, labels: tuple[str, ...] = LABELS, extra: str = "", side: int = 8
) -> str:
    names = ", ".join(f'"{label}"' for label in labels)
    return f"""name = "digits-transfer"
labels = [{names}]

[recipe]
kind = "transfer"
backbone = "{backbone}"
{extra}
[preprocess]
height = {side}
width = {side}
color = "gray"

[training]
epochs = 2
learning_rate = 0.1
min_samples = 4
"""


def _refusal(fed: Federation, task: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``fedge coordinator run`` on ``task`` against the fleet's broker, to its exit."""
    config = fed.coordinator_config(task=task, data_dir=data_dir)
    path = task.with_suffix(".coordinator.toml")
    path.write_text(agent_toml(config))
    return subprocess.run(
        [sys.executable, "-m", "fedge", "coordinator", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
        check=False,
    )


def _mistake_lines(result: subprocess.CompletedProcess[str], named: Path) -> list[str]:
    """The lines of a refusal that name ``named`` (the task file, or the data dir)."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    return [line for line in output.splitlines() if str(named) in line]


def test_bad_tasks_are_refused_with_one_line_each_and_the_fleet_trains_on(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, reference_models: ReferenceModels
) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(reference_models.digits_float32, tasks / "features.tflite")
    with federation(tmp_path / "fed", mosquitto, topics, num_agents=AGENTS) as fed:
        cases = {
            # A head layer fedge does not know.
            "unknown-layer": (_task("features.tflite", extra='layers = ["attention"]\n'), "layers"),
            # 64x64 frames for a backbone that takes 8x8.
            "unfed": (_task("features.tflite", side=64), "backbone takes 8x8x1 images"),
            # A Keras file where a .tflite backbone belongs.
            "not-tflite": (_task("task.keras"), "not a usable .tflite"),
        }
        (tasks / "task.keras").write_bytes(b"PK\x03\x04 not a tflite model")
        for name, (text, expected) in cases.items():
            path = tasks / f"{name}.toml"
            path.write_text(text)
            lines = _mistake_lines(_refusal(fed, path, tmp_path / name), path)
            assert len(lines) == 1, (name, lines)
            assert expected in lines[0], (name, lines)

        # A good coordinator over the same fleet: the agents stayed up and train.
        good = tasks / "good.toml"
        good.write_text(_task("features.tflite"))
        coordinator = fed.start_coordinator(task=good)
        fed.wait_for_agents(AGENTS)
        outcomes = coordinator.run_plan_now(
            RoundPlan(rounds=1, min_agents=AGENTS, deadline_s=60.0, config=RoundConfig(epochs=1))
        )
        assert [o.ok for o in outcomes] == [True], [o.reason for o in outcomes]
        coordinator.stop()
        fed.coordinator = None

        # The same data dir with a label set its head was not made for: one line.
        relabelled = tasks / "relabelled.toml"
        relabelled.write_text(_task("features.tflite", labels=(*LABELS, "5")))
        stored = fed.root / "coordinator"
        lines = _mistake_lines(_refusal(fed, relabelled, stored), stored)
        assert len(lines) == 1, lines
        assert "labels ['0', '1', '2', '3', '4'] -> ['0', '1', '2', '3', '4', '5']" in lines[0]
        for agent in fed.agents:
            _assert_alive(agent)


def test_an_agent_without_the_tasks_labels_sits_out_and_the_round_goes_on(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, reference_models: ReferenceModels
) -> None:
    from coordinator.reference import write_agent_shares

    shares = write_agent_shares(tmp_path / "shares", AGENTS)
    # The last agent's frames are all of labels the task does not name.
    strangers = tmp_path / "shares" / "strangers"
    for index, image in enumerate(sorted(shares[-1].glob("*/*.png"))[:20]):
        (strangers / ("cat" if index % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, strangers / ("cat" if index % 2 else "dog") / image.name)
    shutil.copy(reference_models.digits_float32, tmp_path / "features.tflite")
    task = tmp_path / "task.toml"
    task.write_text(_task("features.tflite"))
    outsider = f"agent-{AGENTS - 1:02d}"
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    try:
        subscribe(client, topics.agent_events(outsider))
        with federation(
            tmp_path / "fed", mosquitto, topics, num_agents=AGENTS, shares=[*shares[:-1], strangers]
        ) as fed:
            coordinator = fed.start_coordinator(task=task)
            fed.wait_for_agents(AGENTS)
            outcomes = coordinator.run_plan_now(
                RoundPlan(
                    rounds=2,
                    min_agents=AGENTS - 1,
                    deadline_s=SIT_OUT_DEADLINE_S,
                    config=RoundConfig(epochs=1, min_samples=4),
                )
            )
            assert [o.ok for o in outcomes] == [True, True], [o.reason for o in outcomes]
            assert [o.metrics["updates"] for o in outcomes] == [AGENTS - 1] * 2
            for number in (1, 2):
                assert outsider not in coordinator.state.update_agents(number)
            messages = collector.wait_for(lambda msgs: len(_sat_out(msgs)) >= 2, EVENT_TIMEOUT_S)
            for event in _sat_out(messages):
                assert "0 samples of the task's labels" in event.message
                assert "cat" in event.message
                assert "dog" in event.message
            for agent in fed.agents:
                _assert_alive(agent)
    finally:
        disconnect(client)


def _assert_alive(agent: AgentProcess) -> None:
    assert agent.process is not None
    assert agent.process.poll() is None, agent.log()
    assert "Traceback" not in agent.log()


def _sat_out(messages: list[Received]) -> list[ErrorEvent]:
    events = []
    for message in messages:
        try:
            event = decode_message(message.payload, ErrorEvent)
        except FedgeError:
            continue  # command acks share the events topic
        if event.reason == "no_samples":
            events.append(event)
    return events
