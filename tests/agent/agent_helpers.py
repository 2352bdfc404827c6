"""Shared set-up for agent tests that go through a real broker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.config import load_agent_config
from agent.daemon import Agent
from coordinator.reference import digit_images_uint8, digit_png, load_digits_split
from coordinator.tflite_export import ReferenceModels
from fedge.harness.federation import agent_toml
from protocol.messages.agent import AgentStatus
from protocol.messages.codec import decode_message
from protocol.topics import Topics
from tests.brokers import MessageCollector, Received

CONNECT_TIMEOUT_S = 15.0
RESULT_TIMEOUT_S = 60.0


def agent_settings(
    broker: Any, topics: Topics, data_dir: Path, models: ReferenceModels | None, **extra: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "broker_url": broker.url,
        "username": getattr(broker, "username", None),
        "password": getattr(broker, "password", None),
        "agent_id": "pi-1",
        "fleet": topics.fleet,
        "topic_root": topics.root,
        "data_dir": data_dir,
        "status_interval_s": 3600.0,
    }
    if models is not None:
        settings |= {
            "model_path": models.digits_float32,
            "labels_path": models.labels,
            "preprocess_path": models.preprocess,
            "model_version": "digits-v1",
        }
    settings |= extra
    return {key: value for key, value in settings.items() if value is not None}


@contextmanager
def running_agent(**settings: Any) -> Iterator[Agent]:
    agent = Agent(load_agent_config(**settings))
    agent.start(wait_connected_s=CONNECT_TIMEOUT_S)
    try:
        yield agent
    finally:
        agent.stop()


def held_out_digits(count: int) -> tuple[list[bytes], list[int]]:
    """The first ``count`` test-split digits as 64x64 PNG frames, with their true labels."""
    split = load_digits_split()
    images = [digit_png(image) for image in digit_images_uint8(split.x_test[:count])]
    return images, [int(label) for label in split.y_test[:count]]


def decoded(messages: list[Received]) -> list[Any]:
    return [decode_message(message.payload) for message in messages]


def events_with_reason(collector: MessageCollector, topic: str, reason: str) -> list[Any]:
    return [e for e in decoded(collector.on_topic(topic)) if getattr(e, "reason", None) == reason]


def to_png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def write_agent_toml(path: Path, settings: dict[str, Any]) -> None:
    path.write_text(agent_toml(settings))


def wait_for_reason(collector: MessageCollector, topic: str, reason: str) -> list[Any]:
    """Wait until an event with ``reason`` arrived on ``topic``; return those events."""

    def arrived(_messages: list[Received]) -> bool:
        return bool(events_with_reason(collector, topic, reason))

    collector.wait_for(arrived, RESULT_TIMEOUT_S)
    return events_with_reason(collector, topic, reason)


@contextmanager
def agent_run_process(config: Path, collector: MessageCollector, topics: Topics) -> Iterator[None]:
    """``fedge agent run --config config`` for the block, which starts once pi-1 is online.

    ``collector`` must already watch the agent's status topic. At the end the agent gets
    SIGTERM and must exit with status 0 and no traceback.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "fedge", "agent", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def online(_messages: list[Received]) -> bool:
            statuses = decoded(collector.on_topic(topics.agent_status("pi-1")))
            return any(isinstance(s, AgentStatus) and s.state == "online" for s in statuses)

        collector.wait_for(online, RESULT_TIMEOUT_S)
        yield
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output.decode(errors="replace")
    assert b"Traceback" not in output
