"""The independent side of detector tests: the layouts' decoding redone by hand.

Nothing here uses the agent's code: the model input is rebuilt from the spec with plain
OpenCV calls, boxes go back to the frame by the spec's definition, and NMS is the textbook
greedy loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from protocol.preprocess import ResizeMode

if TYPE_CHECKING:
    from collections.abc import Sequence

    from protocol.messages.agent import DetectedObject
    from tests.agent.detectors import DetectorFiles


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x_min, y_min, x_max, y_max boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int) -> list[int]:
    """Indices kept by textbook greedy NMS: best first, drop overlaps above ``iou``."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if len(kept) == limit:
            break
        if all(_iou(boxes[i], boxes[j]) <= iou for j in kept):
            kept.append(int(i))
    return kept


# (label, score, x_min, y_min, x_max, y_max in frame pixels), best first
Expected = list[tuple[str, float, tuple[float, float, float, float]]]


def model_input(files: DetectorFiles, encoded: bytes) -> tuple[np.ndarray, tuple[float, ...]]:
    """The model input for one encoded photo and (scale_x, scale_y, left, top) of the frame.

    Written from the spec's definition with plain OpenCV calls, not the agent's code.
    """
    bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    height, width = rgb.shape[:2]
    side = files.spec.width
    if files.spec.resize is ResizeMode.LETTERBOX:
        ratio = min(side / width, side / height)
        inner_w, inner_h = round(width * ratio), round(height * ratio)
        left, top = (side - inner_w) // 2, (side - inner_h) // 2
        canvas: np.ndarray = np.full((side, side, 3), files.spec.pad_value, np.uint8)
        canvas[top : top + inner_h, left : left + inner_w] = cv2.resize(
            rgb, (inner_w, inner_h), interpolation=cv2.INTER_AREA
        )
        placement = (inner_w / width, inner_h / height, float(left), float(top))
    else:
        canvas = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
        placement = (side / width, side / height, 0.0, 0.0)
    x = canvas.astype(np.float32) / np.float32(255.0)
    return x, (*placement, float(width), float(height))


def to_frame(box: np.ndarray, placement: tuple[float, ...]) -> tuple[float, float, float, float]:
    scale_x, scale_y, left, top, width, height = placement
    x0, y0, x1, y1 = box
    return (
        float(np.clip((x0 - left) / scale_x, 0, width)),
        float(np.clip((y0 - top) / scale_y, 0, height)),
        float(np.clip((x1 - left) / scale_x, 0, width)),
        float(np.clip((y1 - top) / scale_y, 0, height)),
    )


def expected_objects(files: DetectorFiles, encoded: bytes, labels: tuple[str, ...]) -> Expected:
    """What the model should find in the photo: its arithmetic redone in NumPy."""
    x, placement = model_input(files, encoded)
    return [(labels[c], s, to_frame(b, placement)) for b, c, s in files.reference(x)]


def raw_ssd_objects(files: DetectorFiles, encoded: bytes, labels: tuple[str, ...]) -> Expected:
    """The four outputs of the bare interpreter, decoded by hand (op order, via the signature)."""
    from ai_edge_litert.interpreter import Interpreter

    x, placement = model_input(files, encoded)
    interpreter = Interpreter(model_content=files.model.read_bytes())
    # The signature names the op's outputs in its order: boxes, classes, scores, count.
    out = interpreter.get_signature_runner()(x=x[np.newaxis])
    count = int(out["output_3"][0])
    boxes = out["output_0"][0, :count].astype(np.float64) * files.spec.width
    found = []
    for i in range(count):
        ymin, xmin, ymax, xmax = boxes[i]
        box = to_frame(np.array([xmin, ymin, xmax, ymax]), placement)
        found.append((labels[int(out["output_1"][0, i])], float(out["output_2"][0, i]), box))
    return found


def assert_objects_match(
    objects: Sequence[DetectedObject], expected: Expected, *, box_tolerance_px: float = 0.05
) -> None:
    """Published objects equal the expected ones: same order, labels, scores and boxes."""
    published = [(o.label, o.score, o.box) for o in objects]
    assert len(published) == len(expected), (published, expected)
    assert expected, "the photo should give at least one object"
    for (label, score, box), (want_label, want_score, want_box) in zip(
        published, expected, strict=True
    ):
        assert label == want_label
        assert abs(score - want_score) < 1e-4
        assert np.allclose(box, want_box, atol=box_tolerance_px), (box, want_box)
