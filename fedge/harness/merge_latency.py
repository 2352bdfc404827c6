"""Merged against separate: the latency of one multi-head model next to its tasks in turn.

Used by ``bench/merge.py`` and ``bench/compress.py``, so both measure merging the same way.
For heads over one backbone, each task's own serving model is composed
(:func:`runtime.composition.compose`), the tasks are merged
(:func:`runtime.merging.merge_models`), and every frame goes through the merged model once
and through the separate models one after another, interleaved frame by frame so that load
on the machine falls on both alike. Latency is wall time of
:meth:`agent.runtime.TfliteModel.predict`, the call an agent's pipeline makes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agent.runtime import TfliteModel
from coordinator.task_producers import head_initial_weights
from coordinator.tflite_export import export_float_tflite
from runtime.composition import Head, compose
from runtime.merging import merge_models

__all__ = ["MergeLatency", "measure_merge", "merge_backbones", "task_heads"]

TASKS = (("door", 3), ("parcel", 2), ("birds", 4))
HIDDEN_UNITS = 64


@dataclass(frozen=True, slots=True)
class MergeLatency:
    """Per frame, medians over runs of each run's median; the spread is the runs' range."""

    tasks: int
    merged_bytes: int
    separate_bytes: int
    merged_ms: float
    separate_ms: float
    merged_range_ms: tuple[float, float]
    separate_range_ms: tuple[float, float]
    # Largest difference between a merged output and the same task's separate model.
    max_abs_diff: float
    frames: int
    runs: int

    @property
    def speedup(self) -> float:
        return self.separate_ms / self.merged_ms

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def measure_merge(
    backbone: bytes,
    heads: Sequence[Head],
    frames: np.ndarray,
    *,
    runs: int = 5,
    num_threads: int = 1,
) -> MergeLatency:
    """Compose each head's model, merge them, check the outputs agree and time both ways."""
    separate_models = [compose(backbone, [head]) for head in heads]
    merged_model = merge_models(separate_models)
    merged = TfliteModel.from_bytes(merged_model, num_threads=num_threads)
    separate = [TfliteModel.from_bytes(m, num_threads=num_threads) for m in separate_models]
    names = [o.name for o in merged.output_details]
    diff = 0.0
    for frame in frames[:16]:
        outputs = merged.predict(frame[np.newaxis])
        for head, model in zip(heads, separate, strict=True):
            (alone,) = model.predict(frame[np.newaxis])
            diff = max(diff, float(np.max(np.abs(outputs[names.index(head.name)] - alone))))
    merged.predict(frames[:1])  # warm both before timing
    for model in separate:
        model.predict(frames[:1])
    merged_runs, separate_runs = [], []
    for _ in range(runs):
        merged_ms, separate_ms = [], []
        for frame in frames:
            x = frame[np.newaxis]
            started = time.perf_counter()
            merged.predict(x)
            between = time.perf_counter()
            for model in separate:
                model.predict(x)
            ended = time.perf_counter()
            merged_ms.append((between - started) * 1e3)
            separate_ms.append((ended - between) * 1e3)
        merged_runs.append(statistics.median(merged_ms))
        separate_runs.append(statistics.median(separate_ms))
    return MergeLatency(
        tasks=len(heads),
        merged_bytes=len(merged_model),
        separate_bytes=sum(len(m) for m in separate_models),
        merged_ms=statistics.median(merged_runs),
        separate_ms=statistics.median(separate_runs),
        merged_range_ms=(min(merged_runs), max(merged_runs)),
        separate_range_ms=(min(separate_runs), max(separate_runs)),
        max_abs_diff=diff,
        frames=len(frames),
        runs=runs,
    )


def merge_backbones() -> dict[str, tuple[bytes, int, int]]:
    """The benchmarks' backbones, Keras's seeded initial weights (latency does not depend on
    the weights; nothing is downloaded): name -> (float .tflite, input side, features)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
    cnn = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))
    mobilenet = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None
    )
    return {
        "workload CNN 64x64": (export_float_tflite(cnn), 64, 64),
        "MobileNetV2 0.35 96x96": (export_float_tflite(mobilenet), 96, 1280),
    }


def task_heads(features: int, count: int) -> list[Head]:
    """``count`` task heads (Dense 64 relu, then softmax over 3, 2 and 4 labels), seeded."""
    return [
        Head(name, tuple(head_initial_weights(features, (HIDDEN_UNITS,), classes, seed=i)))
        for i, (name, classes) in enumerate(TASKS[:count])
    ]
