"""The inference benchmark's workloads: models, frames, statistics and the bare loop.

``bench/inference.py`` measures the agent against :func:`bare_loop` on these workloads: the
reference digits CNN on PNG digits, and a seeded 224x224x3 CNN on scikit-image's photos.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
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
from protocol.errors import MessageError
from protocol.messages.agent import InferenceResult
from protocol.messages.codec import decode_message
from protocol.preprocess import ColorOrder, PreprocessSpec

__all__ = [
    "Arrivals",
    "Sizes",
    "Workload",
    "bare_frame",
    "bare_loop",
    "bare_serving",
    "percentile",
    "summary",
    "workloads",
]

_log = logging.getLogger(__name__)

CACHE_DIR = Path.home() / ".cache" / "fedge" / "bench-inference"

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
RESULT_TIMEOUT_S = 120.0
WARMUP_FRAMES = 5


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


def reference_models(models_dir: Path | None) -> ReferenceModels:
    directory = models_dir or CACHE_DIR / f"reference-e{REFERENCE_EPOCHS}"
    models = ReferenceModels(directory)
    if all(p.is_file() and p.stat().st_size > 0 for p in models.all_paths()):
        return models
    _log.warning("training the reference digits models into %s ...", directory)
    return write_reference_models(directory, epochs=REFERENCE_EPOCHS)


def build_cnn() -> Any:
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


def cnn_files(directory: Path) -> tuple[Path, Path, Path]:
    model = directory / f"cnn224_{'-'.join(map(str, CNN_FILTERS))}_float32.tflite"
    labels = directory / "cnn224_labels.txt"
    spec_path = directory / "cnn224_preprocess.json"
    if not model.is_file():
        from coordinator.tflite_export import export_float_tflite

        _log.warning("converting the 224x224 CNN into %s ...", directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.write_bytes(export_float_tflite(build_cnn()))
    labels.write_text("".join(f"class{i}\n" for i in range(CNN_CLASSES)))
    spec = PreprocessSpec(height=CNN_SIDE_PX, width=CNN_SIDE_PX, color=ColorOrder.RGB)
    spec_path.write_text(spec.model_dump_json())
    return model, labels, spec_path


def photo_frames() -> tuple[bytes, ...]:
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


def digit_frames() -> tuple[bytes, ...]:
    split = load_digits_split()
    return tuple(digit_png(image) for image in digit_images_uint8(split.x_test[:DIGIT_FRAMES]))


def workloads(models_dir: Path | None, digits: Sizes, cnn: Sizes) -> list[Workload]:
    reference = reference_models(models_dir)
    cnn_model, cnn_labels, cnn_spec = cnn_files(models_dir or CACHE_DIR)
    return [
        Workload(
            "digits",
            reference.digits_float32,
            reference.labels,
            reference.preprocess,
            digit_frames(),
            digits,
        ),
        Workload("cnn224", cnn_model, cnn_labels, cnn_spec, photo_frames(), cnn),
    ]


# --- statistics --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median over runs with the spread."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


# --- bare loop ---------------------------------------------------------------------------


def bare_serving(workload: Workload) -> ServingModel:
    serving = load_serving_model(
        workload.model,
        version="bare",
        labels_path=workload.labels,
        preprocess_path=workload.preprocess,
    )
    for i in range(WARMUP_FRAMES):
        bare_frame(serving, workload.frame(i))
    return serving


def bare_frame(serving: ServingModel, image: bytes) -> tuple[float, float, float]:
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


def bare_loop(serving: ServingModel, workload: Workload) -> dict[str, Any]:
    count = workload.sizes.throughput_frames
    cpu_before = time.thread_time()
    stages = [bare_frame(serving, workload.frame(i)) for i in range(count)]
    cpu_ms_per_frame = (time.thread_time() - cpu_before) * MS_PER_S / count
    decode_ms, prepare_ms, invoke_ms = zip(*stages, strict=True)
    total_ms = [sum(frame) for frame in stages]
    return {
        "fps": count / (sum(total_ms) / MS_PER_S),
        "cpu_ms_per_frame": cpu_ms_per_frame,
        "p50_ms": percentile(total_ms, 50),
        "p99_ms": percentile(total_ms, 99),
        "decode_p50_ms": percentile(decode_ms, 50),
        "preprocess_p50_ms": percentile(prepare_ms, 50),
        "invoke_p50_ms": percentile(invoke_ms, 50),
    }


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
