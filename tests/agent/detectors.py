"""Tiny real detectors, built with TensorFlow, and NumPy twins that compute the same thing.

Both detectors look at a grid of cells and fire where a cell is bright, dark or of one
dominant colour, so on a real photo they give a handful of boxes that can be checked by
hand. Each comes with ``reference(x)``: the model's own arithmetic in NumPy on the
preprocessed input, followed by the decoding and NMS that the layout defines, written
here independently of the agent's code.

* :func:`build_ssd`: the TFLite detection post-processing layout, produced the way
  TensorFlow's object-detection API exports SSD models: a ``tf.function`` carrying
  ``experimental_implements`` for ``TFLite_Detection_PostProcess``, which the converter
  turns into that custom op (the test checks the op is really in the model).
* :func:`build_yolo`: one output per anchor, ``cx, cy, w, h, objectness, classes``
  (YOLOv5) or attributes first without objectness (YOLOv8).
* :func:`build_broken_postprocess`: the post-processing layout with NaN outputs or a count
  beyond its rows.

It is also a pytest plugin (see ``tests/conftest.py``): session fixtures build each model once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from protocol.preprocess import DetectionSpec, PreprocessSpec, ResizeMode
from tests.agent.detection_checks import greedy_nms

SSD_SIDE = 96
SSD_GRID = 6
SSD_LABELS = ("bright", "dark")
SSD_IOU = 0.3
SSD_NMS_SCORE = 0.3
SSD_MAX_DETECTIONS = 10
SSD_SCALES = (10.0, 10.0, 5.0, 5.0)  # y, x, h, w

YOLO_SIDE = 128
YOLO_GRID = 8
YOLO_LABELS = ("red", "green", "blue")

# (box as x_min, y_min, x_max, y_max in model-input pixels, class, score), best first
Reference = list[tuple[np.ndarray, int, float]]


@dataclass(frozen=True)
class DetectorFiles:
    model: Path
    labels: Path
    preprocess: Path
    spec: PreprocessSpec
    reference: Callable[[np.ndarray], Reference]


def _convert(module: object, signature: object, directory: Path) -> bytes:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    saved = directory / "saved_model"
    tf.saved_model.save(module, str(saved), signatures=signature)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    converter.allow_custom_ops = True  # TFLite_Detection_PostProcess is a custom op
    model: bytes = converter.convert()
    return model


def _write(
    directory: Path, name: str, model: bytes, labels: tuple[str, ...], spec: PreprocessSpec
) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / f"{name}.tflite"
    model_path.write_bytes(model)
    labels_path = directory / f"{name}_labels.txt"
    labels_path.write_text("\n".join(labels) + "\n")
    # The agent looks for preprocess.json beside a model it is told to load.
    spec_path = directory / "preprocess.json"
    spec_path.write_text(spec.model_dump_json(exclude_none=True))
    return model_path, labels_path, spec_path


def _cells(x: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid, 3) cell means of one (side, side, 3) input (what avg_pool2d does)."""
    side = x.shape[0]
    cell = side // grid
    means: np.ndarray = x.reshape(grid, cell, grid, cell, 3).mean(axis=(1, 3), dtype=np.float64)
    return means


def _sigmoid(z: np.ndarray) -> np.ndarray:
    result: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return result


# -- SSD with the TFLite post-processing op ----------------------------------------------


def _ssd_anchors() -> np.ndarray:
    centres = (np.arange(SSD_GRID) + 0.5) / SSD_GRID
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    side = np.full(SSD_GRID * SSD_GRID, 2.0 / SSD_GRID)
    # (y, x, h, w) per anchor, as the op wants them; overlapping neighbours make NMS work
    return np.stack([cy.ravel(), cx.ravel(), side, side], axis=1).astype(np.float32)


def _ssd_heads(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(box encodings (A, 4) as ty, tx, th, tw; class scores (A, 3) with background)."""
    red, green, blue = cells[..., 0], cells[..., 1], cells[..., 2]
    lum = cells.mean(axis=-1)
    encodings = np.stack([2 * (red - green), 2 * (green - blue), lum - 0.5, 0.5 - lum], -1)
    logits = np.stack([np.zeros_like(lum), 10 * (lum - 0.6), 10 * (0.35 - lum)], -1)
    return encodings.reshape(-1, 4), _sigmoid(logits).reshape(-1, 3)


def _ssd_reference(x: np.ndarray) -> Reference:
    encodings, scores = _ssd_heads(_cells(x, SSD_GRID))
    anchors = _ssd_anchors().astype(np.float64)
    y_scale, x_scale, h_scale, w_scale = SSD_SCALES
    cy = encodings[:, 0] / y_scale * anchors[:, 2] + anchors[:, 0]
    cx = encodings[:, 1] / x_scale * anchors[:, 3] + anchors[:, 1]
    h = np.exp(encodings[:, 2] / h_scale) * anchors[:, 2]
    w = np.exp(encodings[:, 3] / w_scale) * anchors[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * SSD_SIDE
    classes = scores[:, 1:].argmax(axis=1)
    best = scores[:, 1:].max(axis=1)
    candidates = np.flatnonzero(best >= SSD_NMS_SCORE)
    kept = greedy_nms(boxes[candidates], best[candidates], SSD_IOU, SSD_MAX_DETECTIONS)
    return [
        (boxes[candidates[k]], int(classes[candidates[k]]), float(best[candidates[k]]))
        for k in kept
    ]


def _ssd_signature() -> str:
    y_scale, x_scale, h_scale, w_scale = SSD_SCALES
    attrs = [
        ("max_detections", f"i: {SSD_MAX_DETECTIONS}"),
        ("max_classes_per_detection", "i: 1"),
        ("use_regular_nms", "b: false"),
        ("nms_score_threshold", f"f: {SSD_NMS_SCORE:f}"),
        ("nms_iou_threshold", f"f: {SSD_IOU:f}"),
        ("y_scale", f"f: {y_scale:f}"),
        ("x_scale", f"f: {x_scale:f}"),
        ("h_scale", f"f: {h_scale:f}"),
        ("w_scale", f"f: {w_scale:f}"),
        ("num_classes", f"i: {len(SSD_LABELS)}"),
    ]
    body = " ".join(f'attr {{ key: "{k}" value {{ {v} }} }}' for k, v in attrs)
    return f'name: "TFLite_Detection_PostProcess" {body}'


def build_ssd(directory: Path, *, detection: DetectionSpec | None = None) -> DetectorFiles:
    """An SSD-style model whose outputs come from the TFLite_Detection_PostProcess op."""
    import tensorflow as tf

    anchors = _ssd_anchors()

    class Ssd(tf.Module):  # type: ignore[misc]
        @tf.function(experimental_implements=_ssd_signature())  # type: ignore[untyped-decorator]
        def postprocess(
            self, encodings: tf.Tensor, scores: tf.Tensor, anchors: tf.Tensor
        ) -> tuple[tf.Tensor, ...]:
            # A placeholder body: the converter replaces the whole function by the op.
            zero = tf.constant(0.0)
            return zero, zero, zero, zero

        @tf.function(input_signature=[tf.TensorSpec([1, SSD_SIDE, SSD_SIDE, 3], tf.float32)])  # type: ignore[untyped-decorator]
        def detect(self, x: tf.Tensor) -> tuple[tf.Tensor, ...]:
            cell = SSD_SIDE // SSD_GRID
            cells = tf.nn.avg_pool2d(x, cell, cell, "VALID")
            red, green, blue = cells[..., 0], cells[..., 1], cells[..., 2]
            lum = tf.reduce_mean(cells, axis=-1)
            encodings = tf.stack([2 * (red - green), 2 * (green - blue), lum - 0.5, 0.5 - lum], -1)
            logits = tf.stack([tf.zeros_like(lum), 10 * (lum - 0.6), 10 * (0.35 - lum)], -1)
            count = SSD_GRID * SSD_GRID
            found: tuple[tf.Tensor, ...] = self.postprocess(
                tf.reshape(encodings, [1, count, 4]),
                tf.reshape(tf.sigmoid(logits), [1, count, 3]),
                tf.constant(anchors),
            )
            return found

    module = Ssd()
    model = _convert(module, module.detect.get_concrete_function(), directory / "ssd-build")
    spec = PreprocessSpec(height=SSD_SIDE, width=SSD_SIDE, detection=detection)
    paths = _write(directory, "ssd", model, SSD_LABELS, spec)
    return DetectorFiles(*paths, spec=spec, reference=_ssd_reference)


# -- YOLO ----------------------------------------------------------------------------------


def _yolo_table(cells: np.ndarray, *, objectness: bool) -> np.ndarray:
    """(anchors, 4 [+ 1] + 3): cx, cy, w, h in 0..1, objectness, red/green/blue scores."""
    grid = cells.shape[0]
    centres = (np.arange(grid) + 0.5) / grid
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    red, green, blue = cells[..., 0], cells[..., 1], cells[..., 2]
    lum = cells.mean(axis=-1)
    spread = cells.max(axis=-1) - cells.min(axis=-1)
    columns = [
        cx + 0.3 * (red - green) / grid,
        cy + 0.3 * (green - blue) / grid,
        (1.5 + lum) / grid,
        (1.5 + spread) / grid,
    ]
    if objectness:
        columns.append(_sigmoid(12 * (spread - 0.15)))
    columns.extend(_sigmoid(8 * (cells[..., c] - lum - 0.05)) for c in range(3))
    return np.stack(columns, axis=-1).reshape(grid * grid, -1)


def _yolo_reference(
    x: np.ndarray, *, objectness: bool, threshold: float, iou: float, limit: int
) -> Reference:
    table = _yolo_table(_cells(x, YOLO_GRID), objectness=objectness)
    classes = table[:, -3:] * (table[:, 4:5] if objectness else 1.0)
    best_class = classes.argmax(axis=1)
    best = classes.max(axis=1)
    cx, cy, w, h = (table[:, i] for i in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * YOLO_SIDE
    found: Reference = []
    for c in range(3):  # NMS per class, then all classes best first
        mine = np.flatnonzero((best_class == c) & (best >= threshold))
        kept = greedy_nms(boxes[mine], best[mine], iou, limit)
        found.extend((boxes[mine[k]], c, float(best[mine[k]])) for k in kept)
    found.sort(key=lambda item: -item[2])
    return found[:limit]


def build_yolo(
    directory: Path, *, objectness: bool = True, detection: DetectionSpec | None = None
) -> DetectorFiles:
    """A YOLO-style model: (1, 64, 8) with objectness, or (1, 7, 64) without (YOLOv8)."""
    import tensorflow as tf

    class Yolo(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([1, YOLO_SIDE, YOLO_SIDE, 3], tf.float32)])  # type: ignore[untyped-decorator]
        def detect(self, x: tf.Tensor) -> tf.Tensor:
            cell = YOLO_SIDE // YOLO_GRID
            cells = tf.nn.avg_pool2d(x, cell, cell, "VALID")[0]
            centres = (np.arange(YOLO_GRID, dtype=np.float32) + 0.5) / YOLO_GRID
            cy, cx = np.meshgrid(centres, centres, indexing="ij")
            red, green, blue = cells[..., 0], cells[..., 1], cells[..., 2]
            lum = tf.reduce_mean(cells, axis=-1)
            spread = tf.reduce_max(cells, axis=-1) - tf.reduce_min(cells, axis=-1)
            columns = [
                cx + 0.3 * (red - green) / YOLO_GRID,
                cy + 0.3 * (green - blue) / YOLO_GRID,
                (1.5 + lum) / YOLO_GRID,
                (1.5 + spread) / YOLO_GRID,
            ]
            if objectness:
                columns.append(tf.sigmoid(12 * (spread - 0.15)))
            columns.extend(tf.sigmoid(8 * (cells[..., c] - lum - 0.05)) for c in range(3))
            table = tf.reshape(tf.stack(columns, axis=-1), [1, YOLO_GRID * YOLO_GRID, -1])
            return table if objectness else tf.transpose(table, [0, 2, 1])

    module = Yolo()
    model = _convert(module, module.detect.get_concrete_function(), directory / "yolo-build")
    detection = detection or DetectionSpec(threshold=0.3, iou_threshold=0.3)
    spec = PreprocessSpec(
        height=YOLO_SIDE,
        width=YOLO_SIDE,
        resize=ResizeMode.LETTERBOX,
        pad_value=114,
        detection=detection,
    )
    paths = _write(directory, "yolo", model, YOLO_LABELS, spec)

    def reference(x: np.ndarray) -> Reference:
        return _yolo_reference(
            x,
            objectness=objectness,
            threshold=detection.threshold,
            iou=detection.iou_threshold,
            limit=detection.max_objects,
        )

    return DetectorFiles(*paths, spec=spec, reference=reference)


def build_broken_postprocess(directory: Path, fault: str) -> DetectorFiles:
    """A model in the post-processing layout (without the op) whose outputs are wrong.

    ``fault``: ``nan`` (boxes and scores are NaN) or ``count`` (count 15 for 10 rows).
    """
    import tensorflow as tf

    rows = 10

    class Broken(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([1, SSD_SIDE, SSD_SIDE, 3], tf.float32)])  # type: ignore[untyped-decorator]
        def detect(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            level = tf.reduce_mean(x, axis=[1, 2, 3])  # (1,), 0..1
            ones = tf.ones([1, rows]) * level[:, tf.newaxis]
            if fault == "nan":
                nan = tf.math.log(-1.0 - level)  # log of a negative number
                scores = ones * nan[:, tf.newaxis]
                boxes = tf.ones([1, rows, 4]) * nan[:, tf.newaxis, tf.newaxis]
                count = tf.floor(level + 3.0)
            else:
                scores = ones
                boxes = tf.ones([1, rows, 4]) * level[:, tf.newaxis, tf.newaxis] * 0.5
                count = tf.floor(level * 0.5 + 15.0)
            # Keys sort into the op's order: boxes, classes, count, scores.
            return {
                "boxes": boxes,
                "classes": tf.zeros([1, rows]) * level,
                "count": count,
                "scores": scores,
            }

    module = Broken()
    model = _convert(module, module.detect.get_concrete_function(), directory / f"{fault}-build")
    spec = PreprocessSpec(height=SSD_SIDE, width=SSD_SIDE)
    paths = _write(directory, f"broken_{fault}", model, SSD_LABELS, spec)
    return DetectorFiles(*paths, spec=spec, reference=lambda _x: [])


@pytest.fixture(scope="session")
def ssd_detector(tmp_path_factory: pytest.TempPathFactory) -> DetectorFiles:
    return build_ssd(tmp_path_factory.mktemp("ssd"))


@pytest.fixture(scope="session")
def yolo_detector(tmp_path_factory: pytest.TempPathFactory) -> DetectorFiles:
    return build_yolo(tmp_path_factory.mktemp("yolo"))


@pytest.fixture(scope="session")
def yolo8_detector(tmp_path_factory: pytest.TempPathFactory) -> DetectorFiles:
    return build_yolo(tmp_path_factory.mktemp("yolo8"), objectness=False)


@pytest.fixture(scope="session")
def broken_detectors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DetectorFiles]:
    return {
        fault: build_broken_postprocess(tmp_path_factory.mktemp(f"broken-{fault}"), fault)
        for fault in ("nan", "count")
    }
