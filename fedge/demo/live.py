"""What the demo shows: a camera, a results watcher, the live view, the summary and the plot."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table

from fedge.demo.settings import CAMERA_ID, LIVE_WINDOW_FRAMES, DemoSettings
from protocol.errors import FedgeError

logger = logging.getLogger(__name__)


@dataclass
class LiveView:
    """What the live view shows; written by callbacks, read by the render loop."""

    results_by_version: dict[str, deque[bool]] = field(
        default_factory=lambda: defaultdict(lambda: deque(maxlen=LIVE_WINDOW_FRAMES))
    )
    frames_sent: int = 0
    events: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, text: str) -> None:
        with self.lock:
            self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
            del self.events[:-6]


@dataclass(frozen=True, slots=True)
class DemoBroker:
    url: str
    username: str | None
    password: str | None

    def address(self) -> Any:
        from runtime.mqtt import parse_broker_url

        return parse_broker_url(self.url, username=self.username, password=self.password)


def results_watcher(broker: DemoBroker, topics: Any, truth: np.ndarray, live: LiveView) -> Any:
    from protocol.messages.agent import InferenceResult
    from protocol.messages.codec import decode_message
    from runtime.mqtt import MqttLink

    def on_message(_topic: str, payload: bytes) -> None:
        try:
            result = decode_message(payload, InferenceResult)
        except FedgeError:
            return
        index = int(result.frame_id.rsplit("-", 1)[-1]) % len(truth)
        if result.predictions:
            correct = result.predictions[0].label == str(int(truth[index]))
            with live.lock:
                live.results_by_version[result.model_version].append(correct)

    link = MqttLink(
        broker.address(),
        client_id="fedge-demo-watcher",
        clean_session=True,
        on_message=on_message,
    )
    link.subscribe(topics.all_agent_results(), qos=0)
    link.start()
    link.wait_connected(30.0)
    return link


def stream_camera(
    broker: DemoBroker,
    topics: Any,
    images: np.ndarray,
    control: tuple[threading.Event, LiveView],
    fps: float,
) -> None:
    from coordinator.reference import digit_images_uint8, digit_png
    from protocol.frames import FrameMeta, encode_envelope
    from runtime.mqtt import MqttLink

    stop, live = control
    link = MqttLink(
        broker.address(),
        client_id="fedge-demo-camera",
        clean_session=True,
    )
    link.start()
    try:
        link.wait_connected(30.0)
        frames = digit_images_uint8(images)
        sequence = 0
        while not stop.wait(1.0 / fps):
            index = sequence % len(frames)
            payload = encode_envelope(
                digit_png(frames[index]),
                FrameMeta(frame_id=f"{CAMERA_ID}-{index}", timestamp=time.time()),
            )
            link.publish(topics.camera_frames(CAMERA_ID), payload, qos=0)
            sequence += 1
            live.frames_sent = sequence
    except FedgeError as exc:
        live.note(f"camera stopped: {exc}")
    finally:
        link.stop()


def view(coordinator: Any, live: LiveView, settings: DemoSettings) -> Group:
    table = Table(title="federated rounds", expand=False)
    for column in ("round", "state", "selected", "updates", "accuracy", "kB up", "seconds"):
        table.add_column(column, justify="right")
    for record in coordinator.state.rounds():
        metrics = record.metrics
        accuracy = metrics.get("accuracy")
        table.add_row(
            str(record.round),
            record.state if not record.reason else "failed",
            str(len(record.selected)),
            str(metrics.get("updates", "…")),
            f"{accuracy:.3f}" if accuracy is not None else "…",
            f"{metrics.get('bytes_up', 0) / 1000:.1f}" if metrics else "…",
            f"{metrics.get('seconds', 0):.1f}" if metrics else "…",
        )
    online = sum(1 for a in coordinator.fleet.agents().values() if a.online)
    with live.lock:
        inference = ", ".join(
            f"{version}: {100 * float(np.mean(list(v))):.0f}%"
            for version, v in sorted(live.results_by_version.items())[-3:]
            if v
        )
        events = list(live.events)
    lines = [
        f"agents online: {online}/{settings.agents}   camera frames sent: {live.frames_sent}",
        f"live inference accuracy by model (last {LIVE_WINDOW_FRAMES} results): "
        f"{inference or 'waiting for results'}",
        *events,
    ]
    return Group(table, *lines)


def initial_accuracy(coordinator: Any) -> float | None:
    from protocol.messages.rounds import ModelRelease

    text = coordinator.state.release_json("r0")
    if text is None:
        return None
    metrics = ModelRelease.model_validate_json(text).metrics
    return metrics.accuracy if metrics else None


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(title="fedge demo: summary")
    for column in ("round", "selected", "updates", "accuracy", "kB up", "seconds", "note"):
        table.add_column(column, justify="right")
    table.add_row(
        "0", "-", "-", f"{report['initial_accuracy'] or 0:.3f}", "-", "-", "untrained model"
    )
    for entry in report["rounds"]:
        note = ""
        if entry["round"] == report["dropped_in_round"]:
            note = f"{report['dropped_agent']} frozen; closed at the deadline by quorum"
        if entry["reason"]:
            note = entry["reason"]
        accuracy = entry["accuracy"]
        table.add_row(
            str(entry["round"]),
            str(entry["selected"]),
            str(entry["updates"] or 0),
            f"{accuracy:.3f}" if accuracy is not None else "-",
            f"{(entry['bytes_up'] or 0) / 1000:.1f}",
            f"{entry['seconds'] or 0:.1f}",
            note,
        )
    return table


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Accuracy per round as a PNG (matplotlib), the initial model as round 0."""
    from coordinator.figures import accuracy_figure, save_png

    rounds = [0, *(e["round"] for e in report["rounds"])]
    accuracy = [report["initial_accuracy"], *(e["accuracy"] for e in report["rounds"])]
    cut = report["dropped_in_round"]
    figure = accuracy_figure(
        rounds,
        accuracy,
        title="fedge demo: global model accuracy per round",
        marks={cut: f"{report['dropped_agent']} cut off"} if cut else None,
    )
    save_png(figure, path)
