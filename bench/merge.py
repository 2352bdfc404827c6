"""Model merging: one multi-head model against the tasks' own models run in turn.

    python bench/merge.py [--frames 100] [--runs 5] [--out bench/results/merge.json]

Two backbones, each with two and with three task heads (Dense 64 relu then softmax over 3,
2 and 4 labels): the transfer workload's CNN at 64x64 (:mod:`coordinator.transfer_workload`'s
architecture) and a MobileNetV2 (alpha 0.35) feature map at 96x96. Latency does not depend on
the weights, so both are Keras's seeded initial weights: nothing is trained or downloaded.
For each, :func:`fedge.harness.merge_latency.measure_merge` composes every task's serving
model, merges them, checks the merged outputs equal the separate ones and times one invoke of
the merged model against the separate models in turn, frame by frame (LiteRT, one thread).
Prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.task_producers import head_initial_weights
from coordinator.tflite_export import export_float_tflite
from fedge.harness.merge_latency import MergeLatency, measure_merge
from runtime.composition import Head

__all__ = ["main"]

DEFAULT_OUT = Path("bench/results/merge.json")
TASKS = (("door", 3), ("parcel", 2), ("birds", 4))
HIDDEN_UNITS = 64


def _backbones() -> dict[str, tuple[bytes, int, int]]:
    """name -> (.tflite, input side, features)."""
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


def _heads(features: int, count: int) -> list[Head]:
    return [
        Head(name, tuple(head_initial_weights(features, (HIDDEN_UNITS,), classes, seed=i)))
        for i, (name, classes) in enumerate(TASKS[:count])
    ]


def _row(backbone: str, m: MergeLatency) -> str:
    return (
        f"| {backbone} | {m.tasks} | {m.merged_ms:.3f} ({m.merged_range_ms[0]:.3f}-"
        f"{m.merged_range_ms[1]:.3f}) | {m.separate_ms:.3f} ({m.separate_range_ms[0]:.3f}-"
        f"{m.separate_range_ms[1]:.3f}) | {m.speedup:.2f}x | {m.merged_bytes:,} / "
        f"{m.separate_bytes:,} | {m.max_abs_diff:.1e} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    rows = []
    for name, (tflite, side, features) in _backbones().items():
        frames = rng.uniform(0, 1, (args.frames, side, side, 3)).astype(np.float32)
        for count in (2, 3):
            measured = measure_merge(tflite, _heads(features, count), frames, runs=args.runs)
            rows.append(_row(name, measured))
            results.append({"backbone": name, **measured.as_dict()})
    print(
        "| backbone | tasks | merged ms/frame (runs' range) | separate in turn ms/frame "
        "| speedup | bytes merged / separate | max abs diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"frames": args.frames, "runs": args.runs, "results": results}, indent=2)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
