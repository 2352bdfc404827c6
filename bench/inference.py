"""The agent's pipeline against a bare decode+preprocess+invoke loop, side by side.

    python bench/inference.py [--quick] [--runs N] [--models DIR] [--out PATH]

Two models: the reference digits CNN (8x8x1, PNG frames of held-out digits) and a seeded,
untrained float32 CNN with a 224x224x3 input (JPEG frames of scikit-image's photos at
640x480). For each model and each run:

- bare: ``decode_image`` -> ``prepare_input`` -> ``TfliteModel.predict`` per frame, timed;
- throughput: the agent, a ``fedge agent run`` process of its own (TensorFlow blocked, as on
  a Pi) behind a real Mosquitto, gets every frame from a camera of its own (so
  latest-frame-wins drops none), published as fast as possible; frames/s is frames over the
  time from the first publish to the last result; the agent process's CPU time (user plus
  system, all threads) per frame, beside the bare loop's CPU time per frame;
- latency: one enveloped frame at a time, publish -> result round trip; a bare MQTT round
  trip of the same payload (QoS 1, the same client) and a bare frame are measured right
  after each, so the agent's added latency is ``p50(round trip) - p50(bare frame) -
  p50(broker round trip)``; the results' own ``timings`` show the agent's stages.

- the agent process's start-up time (spawn to its retained ``online`` status, model loaded)
  and its resident memory (now and peak) after the runs.

Prints medians over the runs with their spread (min-max) and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt

from agent.model import ServingModel, load_serving_model
from agent.preprocess import decode_image, prepare_input
from coordinator.reference import (
    digit_images_uint8,
    digit_png,
    load_digits_split,
)
from coordinator.tflite_export import ReferenceModels, write_reference_models
from fedge.harness.clients import disconnect, mqtt_client, subscribe
from fedge.harness.measured import MeasuredAgent
from protocol.errors import MessageError
from protocol.frames import FrameMeta, encode_envelope
from protocol.messages.agent import InferenceResult
from protocol.messages.codec import decode_message
from protocol.preprocess import ColorOrder, PreprocessSpec
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

__all__ = ["main"]

_log = logging.getLogger(__name__)

MS_PER_S = 1000.0
REFERENCE_EPOCHS = 5
CNN_SIDE_PX = 224
CNN_CLASSES = 10
CNN_SEED = 0
# Sized so that one invocation takes 10-20 ms with one thread, like a small real CNN.
CNN_FILTERS = (24, 48, 96, 192)
PHOTO_WIDTH_PX = 640
PHOTO_HEIGHT_PX = 480
JPEG_QUALITY = 90
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")
DIGIT_FRAMES = 50
AGENT_ID = "bench-1"
AGENT_CONNECT_TIMEOUT_S = 30.0
RESULT_TIMEOUT_S = 120.0
WARMUP_FRAMES = 5
DEFAULT_OUT = Path("bench/results/inference.json")
CACHE_DIR = Path.home() / ".cache" / "fedge" / "bench-inference"


@dataclass(frozen=True, slots=True)
class Sizes:
    throughput_frames: int
    latency_frames: int


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    model: Path
    labels: Path
    preprocess: Path
    frames: tuple[bytes, ...]  # distinct encoded images, used in turn
    sizes: Sizes

    def frame(self, index: int) -> bytes:
        return self.frames[index % len(self.frames)]


# --- models and frames -----------------------------------------------------------------


def _reference_models(models_dir: Path | None) -> ReferenceModels:
    directory = models_dir or CACHE_DIR / f"reference-e{REFERENCE_EPOCHS}"
    models = ReferenceModels(directory)
    if all(p.is_file() and p.stat().st_size > 0 for p in models.all_paths()):
        return models
    print(f"training the reference digits models into {directory} ...", flush=True)
    return write_reference_models(directory, epochs=REFERENCE_EPOCHS)


def _build_cnn() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(CNN_SEED)
    image = keras.Input(shape=(CNN_SIDE_PX, CNN_SIDE_PX, 3), batch_size=1, name="image")
    x = image
    for filters in CNN_FILTERS:
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    probs = keras.layers.Dense(CNN_CLASSES, activation="softmax", name="probs")(x)
    return keras.Model(image, probs, name="bench_cnn224")


def _cnn_files(directory: Path) -> tuple[Path, Path, Path]:
    model = directory / f"cnn224_{'-'.join(map(str, CNN_FILTERS))}_float32.tflite"
    labels = directory / "cnn224_labels.txt"
    spec_path = directory / "cnn224_preprocess.json"
    if not model.is_file():
        from coordinator.tflite_export import export_float_tflite

        print(f"converting the 224x224 CNN into {directory} ...", flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        model.write_bytes(export_float_tflite(_build_cnn()))
    labels.write_text("".join(f"class{i}\n" for i in range(CNN_CLASSES)))
    spec = PreprocessSpec(height=CNN_SIDE_PX, width=CNN_SIDE_PX, color=ColorOrder.RGB)
    spec_path.write_text(spec.model_dump_json())
    return model, labels, spec_path


def _photo_frames() -> tuple[bytes, ...]:
    from skimage import data

    frames = []
    for name in PHOTO_NAMES:
        rgb = np.asarray(getattr(data, name)())
        if rgb.ndim == 2:
            rgb = np.stack([rgb] * 3, axis=-1)
        bgr = cv2.cvtColor(rgb[..., :3], cv2.COLOR_RGB2BGR)
        resized = cv2.resize(bgr, (PHOTO_WIDTH_PX, PHOTO_HEIGHT_PX), interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"cannot JPEG-encode {name}")
        frames.append(encoded.tobytes())
    return tuple(frames)


def _digit_frames() -> tuple[bytes, ...]:
    split = load_digits_split()
    return tuple(digit_png(image) for image in digit_images_uint8(split.x_test[:DIGIT_FRAMES]))


def _workloads(models_dir: Path | None, digits: Sizes, cnn: Sizes) -> list[Workload]:
    reference = _reference_models(models_dir)
    cnn_model, cnn_labels, cnn_spec = _cnn_files(models_dir or CACHE_DIR)
    return [
        Workload(
            "digits",
            reference.digits_float32,
            reference.labels,
            reference.preprocess,
            _digit_frames(),
            digits,
        ),
        Workload("cnn224", cnn_model, cnn_labels, cnn_spec, _photo_frames(), cnn),
    ]


# --- statistics --------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _summary(values: Sequence[float]) -> dict[str, float]:
    """Median over runs with the spread."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


# --- bare loop ---------------------------------------------------------------------------


def _bare_serving(workload: Workload) -> ServingModel:
    serving = load_serving_model(
        workload.model,
        version="bare",
        labels_path=workload.labels,
        preprocess_path=workload.preprocess,
    )
    for i in range(WARMUP_FRAMES):
        _bare_frame(serving, workload.frame(i))
    return serving


def _bare_frame(serving: ServingModel, image: bytes) -> tuple[float, float, float]:
    """Decode, prepare and invoke one frame; the three stage times in ms."""
    started = time.perf_counter()
    pixels = decode_image(image)
    decoded = time.perf_counter()
    tensor = prepare_input(pixels, serving.spec)
    prepared = time.perf_counter()
    serving.model.predict(tensor)
    invoked = time.perf_counter()
    return (
        (decoded - started) * MS_PER_S,
        (prepared - decoded) * MS_PER_S,
        (invoked - prepared) * MS_PER_S,
    )


def _bare_loop(serving: ServingModel, workload: Workload) -> dict[str, Any]:
    count = workload.sizes.throughput_frames
    cpu_before = time.thread_time()
    stages = [_bare_frame(serving, workload.frame(i)) for i in range(count)]
    cpu_ms_per_frame = (time.thread_time() - cpu_before) * MS_PER_S / count
    decode_ms, prepare_ms, invoke_ms = zip(*stages, strict=True)
    total_ms = [sum(frame) for frame in stages]
    return {
        "fps": count / (sum(total_ms) / MS_PER_S),
        "cpu_ms_per_frame": cpu_ms_per_frame,
        "p50_ms": _percentile(total_ms, 50),
        "p99_ms": _percentile(total_ms, 99),
        "decode_p50_ms": _percentile(decode_ms, 50),
        "preprocess_p50_ms": _percentile(prepare_ms, 50),
        "invoke_p50_ms": _percentile(invoke_ms, 50),
    }


# --- through the broker ------------------------------------------------------------------


class Arrivals:
    """Results and echoes as they arrive, keyed by frame id (or echo topic order)."""

    def __init__(self, results_topic: str, echo_topic: str) -> None:
        self._results_topic = results_topic
        self._echo_topic = echo_topic
        self._condition = threading.Condition()
        self.results: dict[str, tuple[float, InferenceResult]] = {}
        self.echoes = 0
        self.last_echo_at = 0.0
        self.errors: list[str] = []

    def on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        arrived = time.perf_counter()
        if message.topic == self._echo_topic:
            with self._condition:
                self.echoes += 1
                self.last_echo_at = arrived
                self._condition.notify_all()
            return
        if message.topic != self._results_topic:
            return
        try:
            result = decode_message(bytes(message.payload), InferenceResult)
        except MessageError as exc:  # a broken result must show up in the report, not hang it
            with self._condition:
                self.errors.append(str(exc))
            return
        with self._condition:
            self.results[result.frame_id] = (arrived, result)
            self._condition.notify_all()

    def has_result(self, frame_id: str) -> Callable[[], bool]:
        return lambda: frame_id in self.results

    def has_echoes(self, count: int) -> Callable[[], bool]:
        return lambda: self.echoes >= count

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._condition:
            if not self._condition.wait_for(predicate, RESULT_TIMEOUT_S):
                raise TimeoutError(f"timed out waiting for {what} (errors: {self.errors[:3]})")


@dataclass(slots=True)
class Link:
    client: mqtt.Client
    agent: MeasuredAgent
    arrivals: Arrivals
    topics: Topics
    echo_topic: str


def _envelope(image: bytes, frame_id: str) -> bytes:
    return encode_envelope(image, FrameMeta(frame_id=frame_id))


def _throughput(link: Link, workload: Workload, run: int) -> dict[str, Any]:
    count = workload.sizes.throughput_frames
    ids = [f"t{run}-{i}" for i in range(count)]
    # Payloads are built before the clock starts: only the publishing counts.
    payloads = [
        (link.topics.camera_frames(f"t{run}-cam{i}"), _envelope(workload.frame(i), ids[i]))
        for i in range(count)
    ]
    cpu_before = link.agent.cpu_s()
    started = time.perf_counter()
    for topic, payload in payloads:
        link.client.publish(topic, payload, qos=1)
    link.arrivals.wait(
        lambda: all(frame_id in link.arrivals.results for frame_id in ids),
        f"{count} throughput results",
    )
    cpu_ms_per_frame = (link.agent.cpu_s() - cpu_before) * MS_PER_S / count
    finished = max(link.arrivals.results[frame_id][0] for frame_id in ids)
    return {"fps": count / (finished - started), "cpu_ms_per_frame": cpu_ms_per_frame}


def _latency(link: Link, serving: ServingModel, workload: Workload, run: int) -> dict[str, Any]:
    round_trips, echoes, bare = [], [], []
    timings: dict[str, list[float]] = {"decode": [], "preprocess": [], "invoke": [], "total": []}
    camera = link.topics.camera_frames(f"l{run}-cam")
    for i in range(workload.sizes.latency_frames):
        frame_id = f"l{run}-{i}"
        payload = _envelope(workload.frame(i), frame_id)
        started = time.perf_counter()
        link.client.publish(camera, payload, qos=1)
        link.arrivals.wait(link.arrivals.has_result(frame_id), frame_id)
        arrived, result = link.arrivals.results[frame_id]
        round_trips.append((arrived - started) * MS_PER_S)
        timings["decode"].append(result.timings.decode_ms)
        timings["preprocess"].append(result.timings.preprocess_ms)
        timings["invoke"].append(result.timings.invoke_ms)
        timings["total"].append(result.timings.total_ms)
        # The same payload through the broker and straight back: what MQTT alone costs.
        seen = link.arrivals.echoes
        started = time.perf_counter()
        link.client.publish(link.echo_topic, payload, qos=1)
        link.arrivals.wait(link.arrivals.has_echoes(seen + 1), "echo")
        echoes.append((link.arrivals.last_echo_at - started) * MS_PER_S)
        # The bare frame right alongside: a change in the machine's load hits both alike.
        bare.append(sum(_bare_frame(serving, workload.frame(i))))
    return {
        "round_trip_p50_ms": _percentile(round_trips, 50),
        "round_trip_p99_ms": _percentile(round_trips, 99),
        "broker_round_trip_p50_ms": _percentile(echoes, 50),
        "broker_round_trip_p99_ms": _percentile(echoes, 99),
        "bare_p50_ms": _percentile(bare, 50),
        **{f"agent_{name}_p50_ms": _percentile(values, 50) for name, values in timings.items()},
    }


@contextmanager
def _agent_behind_broker(
    workload: Workload, workdir: Path, *, reliable_results: bool
) -> Iterator[Link]:
    binary = find_mosquitto()
    if binary is None:
        raise RuntimeError("mosquitto is not installed (apt install mosquitto)")
    broker = MosquittoProcess(binary, workdir / "broker")
    broker.start()
    try:
        topics = Topics(fleet="bench")
        settings = {
            "broker_url": broker.url,
            "agent_id": AGENT_ID,
            "fleet": topics.fleet,
            "topic_root": topics.root,
            "data_dir": workdir / "agent",
            "status_interval_s": 3600.0,
            "model_path": workload.model,
            "labels_path": workload.labels,
            "preprocess_path": workload.preprocess,
            "model_version": f"{workload.name}-bench",
            "reliable_results": reliable_results,
        }
        # Another root, so the agent never sees the echoes.
        echo_topic = Topics(root="bench-echo", fleet="bench").camera_frames("echo")
        arrivals = Arrivals(topics.agent_results(AGENT_ID), echo_topic)
        client = mqtt_client(broker)
        client.on_message = arrivals.on_message
        try:
            subscribe(client, topics.agent_results(AGENT_ID), qos=1)
            subscribe(client, echo_topic, qos=1)
            with MeasuredAgent(broker, topics, settings, workdir / "agent") as agent:
                link = Link(client, agent, arrivals, topics, echo_topic)
                _warm_up(link, workload)
                yield link
        finally:
            disconnect(client)
    finally:
        broker.stop()


def _warm_up(link: Link, workload: Workload) -> None:
    camera = link.topics.camera_frames("warm-up")
    for i in range(WARMUP_FRAMES):
        frame_id = f"w-{i}"
        link.client.publish(camera, _envelope(workload.frame(i), frame_id), qos=1)
        link.arrivals.wait(link.arrivals.has_result(frame_id), frame_id)


# --- one workload ------------------------------------------------------------------------


def _measure(workload: Workload, runs: int, *, reliable_results: bool) -> dict[str, Any]:
    per_run: list[dict[str, Any]] = []
    serving = _bare_serving(workload)
    with (
        tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp,
        _agent_behind_broker(workload, Path(tmp), reliable_results=reliable_results) as link,
    ):
        for run in range(runs):
            # Alternated, so a change in the machine's load hits both sides alike.
            bare = _bare_loop(serving, workload)
            throughput = _throughput(link, workload, run)
            latency = _latency(link, serving, workload, run)
            added = (
                latency["round_trip_p50_ms"]
                - latency["bare_p50_ms"]
                - latency["broker_round_trip_p50_ms"]
            )
            per_run.append(
                {
                    "agent_startup_s": link.agent.startup_s,
                    "agent_memory": link.agent.memory_bytes(),
                    "cpu_beyond_bare_ms_per_frame": (
                        throughput["cpu_ms_per_frame"] - bare["cpu_ms_per_frame"]
                    ),
                    "bare": bare,
                    "agent_throughput": throughput,
                    "agent_latency": latency,
                    "throughput_ratio": throughput["fps"] / bare["fps"],
                    "added_p50_ms": added,
                    "internal_overhead_p50_ms": (
                        latency["agent_total_p50_ms"] - latency["bare_p50_ms"]
                    ),
                }
            )
    return {
        "model": str(workload.model),
        "frame_bytes_mean": statistics.mean(len(f) for f in workload.frames),
        "throughput_frames": workload.sizes.throughput_frames,
        "latency_frames": workload.sizes.latency_frames,
        "runs": per_run,
        "summary": _summarize(per_run),
    }


_SUMMARY_FIELDS: dict[str, Callable[[dict[str, Any]], float]] = {
    "bare_fps": lambda r: r["bare"]["fps"],
    "agent_fps": lambda r: r["agent_throughput"]["fps"],
    "throughput_ratio": lambda r: r["throughput_ratio"],
    "bare_p50_ms": lambda r: r["bare"]["p50_ms"],
    "bare_p50_ms_interleaved": lambda r: r["agent_latency"]["bare_p50_ms"],
    "bare_decode_p50_ms": lambda r: r["bare"]["decode_p50_ms"],
    "bare_preprocess_p50_ms": lambda r: r["bare"]["preprocess_p50_ms"],
    "bare_invoke_p50_ms": lambda r: r["bare"]["invoke_p50_ms"],
    "agent_round_trip_p50_ms": lambda r: r["agent_latency"]["round_trip_p50_ms"],
    "agent_round_trip_p99_ms": lambda r: r["agent_latency"]["round_trip_p99_ms"],
    "broker_round_trip_p50_ms": lambda r: r["agent_latency"]["broker_round_trip_p50_ms"],
    "agent_decode_p50_ms": lambda r: r["agent_latency"]["agent_decode_p50_ms"],
    "agent_preprocess_p50_ms": lambda r: r["agent_latency"]["agent_preprocess_p50_ms"],
    "agent_invoke_p50_ms": lambda r: r["agent_latency"]["agent_invoke_p50_ms"],
    "agent_total_p50_ms": lambda r: r["agent_latency"]["agent_total_p50_ms"],
    "internal_overhead_p50_ms": lambda r: r["internal_overhead_p50_ms"],
    "added_p50_ms": lambda r: r["added_p50_ms"],
    "bare_cpu_ms_per_frame": lambda r: r["bare"]["cpu_ms_per_frame"],
    "agent_cpu_ms_per_frame": lambda r: r["agent_throughput"]["cpu_ms_per_frame"],
    "cpu_beyond_bare_ms_per_frame": lambda r: r["cpu_beyond_bare_ms_per_frame"],
    "agent_startup_s": lambda r: r["agent_startup_s"],
    "agent_rss_mb": lambda r: r["agent_memory"]["rss"] / 2**20,
    "agent_peak_rss_mb": lambda r: r["agent_memory"]["peak_rss"] / 2**20,
}


def _summarize(per_run: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {name: _summary([get(r) for r in per_run]) for name, get in _SUMMARY_FIELDS.items()}


# --- report ------------------------------------------------------------------------------


def _table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = [f"{'metric':<28}" + "".join(f"{name + ' median (min-max)':>34}" for name in names)]
    for field in _SUMMARY_FIELDS:
        cells = []
        for name in names:
            s = results[name]["summary"][field]
            cells.append(f"{s['median']:>12.2f} ({s['min']:.2f}-{s['max']:.2f})".rjust(34))
        lines.append(f"{field:<28}" + "".join(cells))
    return "\n".join(lines)


def _headlines(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, result in results.items():
        s = result["summary"]
        lines.append(
            f"{name}: agent/bare throughput {s['throughput_ratio']['median']:.2f}x, "
            f"added p50 latency {s['added_p50_ms']['median']:.1f} ms beyond one broker "
            f"round trip ({s['broker_round_trip_p50_ms']['median']:.1f} ms); agent's own "
            f"stages {s['internal_overhead_p50_ms']['median']:+.2f} ms against the bare loop; "
            f"agent CPU {s['cpu_beyond_bare_ms_per_frame']['median']:+.2f} ms/frame beyond "
            f"the bare loop; start-up {s['agent_startup_s']['median']:.1f} s, peak RSS "
            f"{s['agent_peak_rss_mb']['median']:.0f} MB"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--digits-frames", type=int, default=300, help="frames per run, digits")
    parser.add_argument("--cnn-frames", type=int, default=100, help="frames per run, 224 CNN")
    parser.add_argument(
        "--latency-frames", type=int, default=100, help="one-at-a-time frames per run (max)"
    )
    parser.add_argument("--models", type=Path, help="model directory (default: a cache)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument(
        "--no-reliable-results",
        dest="reliable_results",
        action="store_false",
        help="agent publishes results without its on-disk outbox",
    )
    parser.add_argument("--quick", action="store_true", help="a small version, for a smoke test")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.runs, args.digits_frames, args.cnn_frames, args.latency_frames = 2, 60, 20, 20

    digits = Sizes(args.digits_frames, min(args.latency_frames, args.digits_frames))
    cnn = Sizes(args.cnn_frames, min(args.latency_frames // 2 or 1, args.cnn_frames))
    workloads = _workloads(args.models, digits, cnn)
    results: dict[str, dict[str, Any]] = {}
    for workload in workloads:
        print(f"measuring {workload.name} ({args.runs} runs) ...", flush=True)
        results[workload.name] = _measure(
            workload, args.runs, reliable_results=args.reliable_results
        )

    print()
    print(_table(results))
    print()
    for line in _headlines(results):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_count": os.cpu_count(),
        "runs": args.runs,
        "reliable_results": args.reliable_results,
        "workloads": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
