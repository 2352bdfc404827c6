"""A running agent and coordinator serve Prometheus metrics that follow what they do."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from coordinator.tflite_export import ReferenceModels
from fedge.metrics import CONTENT_TYPE
from protocol.messages.rounds import RoundConfig, UpdateEncoding
from protocol.topics import Topics
from tests.agent.agent_helpers import (
    RESULT_TIMEOUT_S,
    agent_settings,
    held_out_digits,
    running_agent,
)
from tests.brokers import MosquittoProcess, disconnect, free_port, mqtt_client, publish, wait_until
from tests.system.federation import federation
from tests.system.test_metrics_format import Family, parse_exposition

pytestmark = pytest.mark.broker

HTTP_TIMEOUT_S = 10.0
FRAMES = 5


def scrape(port: int) -> dict[str, Family]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE
        return parse_exposition(response.read().decode("utf-8"))


def _value(families: dict[str, Family], name: str, **labels: str) -> float:
    family = families.get(name) or families[name.rsplit("_", 1)[0]]  # histogram series
    return family.value(name, **labels)


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
            assert _value(before, "fedge_agent_frames_received_total") == 0
            assert _value(before, "fedge_agent_frame_seconds_count") == 0
            assert _value(before, "fedge_agent_model_info", version="digits-v1") == 1
            assert _value(before, "fedge_agent_outbox_messages") >= 0
            for n, image in enumerate(images):
                publish(client, topics.camera_frames(f"cam{n}"), image)
            publish(client, topics.camera_frames("broken"), b"these bytes are no image")

            def settled() -> bool:
                now = scrape(port)
                done = _value(now, "fedge_agent_frames_processed_total")
                refused = _value(now, "fedge_agent_frames_rejected_total")
                return done == FRAMES and refused == 1

            wait_until(settled, RESULT_TIMEOUT_S, what="frames counted on /metrics")
            after = scrape(port)
    finally:
        disconnect(client)
    assert _value(after, "fedge_agent_frames_received_total") == FRAMES + 1
    assert _value(after, "fedge_agent_frames_dropped_total", reason="stale") == 0
    assert _value(after, "fedge_agent_frames_dropped_total", reason="rate") == 0
    assert _value(after, "fedge_agent_errors_total") >= 1
    latency = after["fedge_agent_frame_seconds"]
    assert latency.kind == "histogram"
    assert latency.value("fedge_agent_frame_seconds_count") == FRAMES
    assert latency.value("fedge_agent_frame_seconds_bucket", le="+Inf") == FRAMES
    assert latency.value("fedge_agent_frame_seconds_sum") > 0


@pytest.mark.system
def test_the_coordinator_serves_round_metrics_after_a_round(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    port = free_port()
    with federation(tmp_path, mosquitto, topics, num_agents=2, trainer="litert") as fed:
        coordinator = fed.start_coordinator(metrics_port=port)
        before = scrape(port)
        assert _value(before, "fedge_coordinator_rounds_total", outcome="done") == 0
        assert _value(before, "fedge_coordinator_round") == 0
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
    assert _value(after, "fedge_coordinator_rounds_total", outcome="done") == 1
    assert _value(after, "fedge_coordinator_rounds_total", outcome="failed") == 0
    assert _value(after, "fedge_coordinator_round") == outcome.round
    assert _value(after, "fedge_coordinator_updates_total") == outcome.metrics["updates"] == 2
    assert _value(after, "fedge_coordinator_update_bytes_total") == outcome.metrics["bytes_up"]
    assert _value(after, "fedge_coordinator_update_bytes_total") > 0
    assert _value(after, "fedge_coordinator_accuracy") == pytest.approx(outcome.metrics["accuracy"])
    assert _value(after, "fedge_coordinator_round_seconds_count") == 1
