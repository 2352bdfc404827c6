"""A running agent and coordinator serve Prometheus metrics that follow what they do."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from coordinator.tflite_export import ReferenceModels
from fedge.harness.federation import federation
from protocol.messages.codec import decode_message
from protocol.messages.rounds import CoordinatorState as Phase
from protocol.messages.rounds import CoordinatorStatus, RoundConfig, UpdateEncoding
from protocol.topics import Topics
from tests.agent.agent_helpers import (
    RESULT_TIMEOUT_S,
    agent_settings,
    held_out_digits,
    running_agent,
)
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    free_port,
    mqtt_client,
    publish,
    subscribe,
    wait_until,
)
from tests.system.test_metrics_format import (
    AGENT_METRICS,
    COORDINATOR_METRICS,
    PROCESS_METRICS,
    Scrape,
    scrape,
)

pytestmark = pytest.mark.broker

FRAMES = 5
ROUND_TIMEOUT_S = 180.0
CLI_TIMEOUT_S = 60.0


def test_a_running_agent_serves_frame_counters_and_a_latency_histogram(
    mosquitto: MosquittoProcess,
    topics: Topics,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    port = free_port()
    settings = agent_settings(mosquitto, topics, tmp_path, reference_models, metrics_port=port)
    images, _ = held_out_digits(FRAMES)
    client = mqtt_client(mosquitto)
    try:
        with running_agent(**settings):
            before = scrape(port)
            assert before.value("fedge_agent_frames_received_total") == 0
            assert before.value("fedge_agent_frame_seconds_count") == 0
            assert before.value("fedge_agent_model_info", version="digits-v1") == 1
            assert before.value("fedge_agent_outbox_messages") >= 0
            for n, image in enumerate(images):
                publish(client, topics.camera_frames(f"cam{n}"), image)
            publish(client, topics.camera_frames("broken"), b"these bytes are no image")

            def settled() -> bool:
                now = scrape(port)
                done = now.value("fedge_agent_frames_processed_total")
                refused = now.value("fedge_agent_frames_rejected_total")
                return done == FRAMES and refused == 1

            wait_until(settled, RESULT_TIMEOUT_S, what="frames counted on /metrics")
            after = scrape(port)
    finally:
        disconnect(client)
    assert after.value("fedge_agent_frames_received_total") == FRAMES + 1
    assert after.value("fedge_agent_frames_dropped_total", reason="stale") == 0
    assert after.value("fedge_agent_frames_dropped_total", reason="rate") == 0
    assert after.value("fedge_agent_errors_total") >= 1
    after.has(AGENT_METRICS)
    assert after.value("fedge_agent_frame_seconds_count") == FRAMES
    assert after.value("fedge_agent_frame_seconds_bucket", le="+Inf") == FRAMES
    assert after.value("fedge_agent_frame_seconds_sum") > 0


@pytest.mark.system
def test_the_coordinator_serves_round_metrics_after_a_round(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    port = free_port()
    with federation(tmp_path, mosquitto, topics, num_agents=2, trainer="litert") as fed:
        coordinator = fed.start_coordinator(metrics_port=port)
        before = scrape(port)
        assert before.value("fedge_coordinator_rounds_total", outcome="done") == 0
        assert before.value("fedge_coordinator_round") == 0
        fed.wait_for_agents(2)
        (outcome,) = coordinator.run_plan_now(
            RoundPlan(
                rounds=1,
                min_agents=2,
                deadline_s=60.0,
                config=RoundConfig(update_encoding=UpdateEncoding.INT8),
            )
        )
        assert outcome.ok, outcome.reason
        after = scrape(port)
    assert after.value("fedge_coordinator_rounds_total", outcome="done") == 1
    assert after.value("fedge_coordinator_rounds_total", outcome="failed") == 0
    assert after.value("fedge_coordinator_round") == outcome.round
    assert after.value("fedge_coordinator_updates_total") == outcome.metrics["updates"] == 2
    assert after.value("fedge_coordinator_update_bytes_total") == outcome.metrics["bytes_up"]
    assert after.value("fedge_coordinator_update_bytes_total") > 0
    assert after.value("fedge_coordinator_accuracy") == pytest.approx(outcome.metrics["accuracy"])
    assert after.value("fedge_coordinator_round_seconds_count") == 1


def _coordinator_ready(topic: str) -> Callable[[list[Received]], bool]:
    """An idle status naming a release: the coordinator has finished starting and takes
    commands (one arriving earlier is refused; see test_federated_faults._is_ready)."""

    def ready(messages: list[Received]) -> bool:
        statuses = [
            decode_message(m.payload, CoordinatorStatus)
            for m in messages
            if m.topic == topic and m.payload
        ]
        return any(s.state is Phase.IDLE and s.model_version is not None for s in statuses)

    return ready


@pytest.mark.system
def test_agent_and_coordinator_processes_serve_what_the_client_library_parses(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    agent_ports = {"agent-00": free_port(), "agent-01": free_port()}
    coordinator_port = free_port()
    per_agent = {agent: {"metrics_port": port} for agent, port in agent_ports.items()}
    collector = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=collector)
    subscribe(watcher, topics.coordinator_status())
    try:
        with federation(tmp_path, mosquitto, topics, num_agents=2, per_agent=per_agent) as fed:
            coordinator = fed.start_coordinator_process(metrics_port=coordinator_port)
            collector.wait_for(_coordinator_ready(topics.coordinator_status()), CLI_TIMEOUT_S)
            started = subprocess.run(
                [
                    *(sys.executable, "-m", "fedge", "round", "start", "--broker", mosquitto.url),
                    *("--fleet", topics.fleet, "--root", topics.root, "--rounds", "1"),
                    *("--min-agents", "2", "--deadline", "60s", "--encoding", "int8"),
                ],
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT_S,
                check=False,
            )
            assert started.returncode == 0, started.stdout + started.stderr

            def served_round_one() -> bool:
                # Agents read their model's version when scraped: r1 once they swapped to it.
                done = scrape(coordinator_port).value(
                    "fedge_coordinator_rounds_total", outcome="done"
                )
                return done == 1 and all(
                    _versions(scrape(port)) == {"r1"} for port in agent_ports.values()
                )

            wait_until(served_round_one, ROUND_TIMEOUT_S, what="round 1 served by both agents")
            agents = [scrape(port) for port in agent_ports.values()]
            after = scrape(coordinator_port)
            coordinator.stop()
            assert "Traceback" not in coordinator.log(), coordinator.log()[-3000:]
    finally:
        disconnect(watcher)
    after.has(COORDINATOR_METRICS)
    after.has(PROCESS_METRICS)
    assert after.value("fedge_coordinator_updates_total") == 2
    assert after.value("fedge_coordinator_update_bytes_total") > 0
    assert 0 < after.value("fedge_coordinator_accuracy") <= 1
    assert after.value("fedge_coordinator_round_seconds_count") == 1
    for agent in agents:
        agent.has(AGENT_METRICS)
        agent.has(PROCESS_METRICS)
        assert agent.value("process_resident_memory_bytes") > 0


def _versions(scraped: Scrape) -> set[str]:
    return {s.labels["version"] for s in scraped.families["fedge_agent_model_info"].samples}
