"""Detector outputs to objects: label, score and a box in pixels of the frame as it was sent.

Two layouts are recognised, once, when a model loads (:func:`resolve_detector`):

``tflite_postprocess``
    four outputs, boxes (1, M, 4) as normalised ``ymin, xmin, ymax, xmax``, classes (1, M),
    scores (1, M) and count (1,): what the ``TFLite_Detection_PostProcess`` op produces in
    SSD MobileNet and EfficientDet-Lite exports. Which output is which is read from the op
    itself when the model carries it, else from the spec's ``outputs``, else from the op's
    own order (boxes, classes, scores, count) among outputs of matching shapes.
``yolo``
    one output, (1, N, K) or (1, K, N) with anchors outnumbering attributes: per anchor
    ``cx, cy, w, h``, an objectness score if the layout has one, then one score per class.
    Scores are objectness times class score; non-maximum suppression is OpenCV's, per class
    unless ``class_agnostic_nms``.

Anything else is no detector (None), and the caller reports outputs as before. Each frame's
outputs are checked before use: non-finite values, shapes that differ from the loaded ones
and a count beyond the returned rows raise :class:`~protocol.errors.ModelError` with reason
``bad_output``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from agent.preprocess import InputGeometry
from protocol.errors import ModelError
from protocol.preprocess import BoxUnits, DetectionFormat, DetectionSpec, OutputRole

__all__ = [
    "POSTPROCESS_OP",
    "Detection",
    "DetectionLimits",
    "Detector",
    "resolve_detector",
]

POSTPROCESS_OP: Final = "TFLite_Detection_PostProcess"
# Scores a little outside 0..1 come from dequantised uint8 outputs; beyond this they are
# logits or garbage, not probabilities.
_SCORE_SLACK: Final = 0.01
# Greedy NMS is quadratic: keep the best candidates only (an 80-class YOLO at threshold 0
# would otherwise hand OpenCV 25,200 boxes per frame).
MAX_NMS_CANDIDATES: Final = 3000
_ROLE_ORDER: Final = (OutputRole.BOXES, OutputRole.CLASSES, OutputRole.SCORES, OutputRole.COUNT)
_BOX_SIDES: Final = 4

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Detection:
    """One object: ``box`` is ``x_min, y_min, x_max, y_max`` in pixels of the frame."""

    index: int
    label: str
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class DetectionLimits:
    """What a frame's objects are filtered by: the spec's values or live overrides."""

    threshold: float
    max_objects: int
    iou_threshold: float


@dataclass(frozen=True, slots=True)
class Detector:
    """A recognised layout, fixed at load time; :meth:`decode` runs once per frame."""

    spec: DetectionSpec
    format: DetectionFormat
    input_width: int
    input_height: int
    shapes: tuple[tuple[int, ...], ...]  # every output's shape as loaded
    # tflite_postprocess: positions of boxes, classes, scores and count among the outputs
    roles: tuple[int, int, int, int] = (0, 1, 2, 3)
    # yolo: attributes first, (1, K, N); and whether column 4 is objectness
    transposed: bool = False
    objectness: bool = True

    def limits(
        self,
        threshold: float | None = None,
        max_objects: int | None = None,
        iou_threshold: float | None = None,
    ) -> DetectionLimits:
        """The spec's limits, with any given override in place of its value."""
        spec = self.spec
        return DetectionLimits(
            threshold=spec.threshold if threshold is None else threshold,
            max_objects=spec.max_objects if max_objects is None else max_objects,
            iou_threshold=spec.iou_threshold if iou_threshold is None else iou_threshold,
        )

    def decode(
        self,
        outputs: Sequence[np.ndarray],
        geometry: InputGeometry,
        labels: Sequence[str] | None,
        limits: DetectionLimits,
    ) -> list[Detection]:
        """The objects of one frame, best first, at most ``limits.max_objects``."""
        shapes = tuple(tuple(int(d) for d in o.shape) for o in outputs)
        if shapes != self.shapes:
            raise _bad(f"outputs shaped {shapes}, but the model declared {self.shapes}")
        if self.format is DetectionFormat.TFLITE_POSTPROCESS:
            boxes, classes, scores = self._postprocessed(outputs, limits)
        else:
            boxes, classes, scores = self._yolo(outputs[0][0], limits)
        x_min, y_min = geometry.to_frame(boxes[:, 0], boxes[:, 1])
        x_max, y_max = geometry.to_frame(boxes[:, 2], boxes[:, 3])
        names = labels or ()
        found = []
        for i, cls in enumerate(classes):
            name_at = int(cls) + self.spec.label_offset
            found.append(
                Detection(
                    index=int(cls),
                    label=names[name_at] if name_at < len(names) else str(int(cls)),
                    score=float(scores[i]),
                    box=(float(x_min[i]), float(y_min[i]), float(x_max[i]), float(y_max[i])),
                )
            )
        return found

    # -- the two layouts: (boxes as x_min, y_min, x_max, y_max in input pixels, classes,
    # scores), filtered, best first

    def _postprocessed(
        self, outputs: Sequence[np.ndarray], limits: DetectionLimits
    ) -> tuple[Floats, npt.NDArray[np.int64], Floats]:
        boxes_at, classes_at, scores_at, count_at = self.roles
        rows = self.shapes[boxes_at][1]
        count = float(np.asarray(outputs[count_at]).reshape(-1)[0])
        if not (np.isfinite(count) and count == int(count) and 0 <= count <= rows):
            raise _bad(f"detection count {count} is not a whole number from 0 to {rows}")
        n = int(count)
        boxes = np.asarray(outputs[boxes_at], dtype=np.float64)[0, :n]
        classes = np.asarray(outputs[classes_at], dtype=np.float64).reshape(-1)[:n]
        scores = _probabilities(np.asarray(outputs[scores_at]).reshape(-1)[:n], "scores")
        _require_finite(boxes, "boxes")
        _require_finite(classes, "classes")
        if np.any(classes < 0) or np.any(classes != np.rint(classes)):
            raise _bad("classes must be whole numbers of at least 0")
        # ymin, xmin, ymax, xmax; either corner order is accepted
        ys, xs = boxes[:, 0::2], boxes[:, 1::2]
        corners = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
        corners = self._to_input_pixels(corners)
        order = np.argsort(-scores, kind="stable")
        order = order[scores[order] >= limits.threshold][: limits.max_objects]
        return corners[order], classes[order].astype(np.int64), scores[order]

    def _yolo(
        self, output: np.ndarray, limits: DetectionLimits
    ) -> tuple[Floats, npt.NDArray[np.int64], Floats]:
        table = np.asarray(output, dtype=np.float64)
        if self.transposed:
            table = table.T
        _require_finite(table, "YOLO output")
        first_class = 5 if self.objectness else 4
        class_scores = _probabilities(table[:, first_class:], "class scores")
        if self.objectness:
            class_scores = class_scores * _probabilities(table[:, 4], "objectness")[:, None]
        classes = np.argmax(class_scores, axis=1)
        scores = class_scores[np.arange(len(table)), classes]
        keep = np.flatnonzero(scores >= limits.threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")][:MAX_NMS_CANDIDATES]
        centre = table[keep, :4]
        half_w, half_h = np.abs(centre[:, 2]) / 2, np.abs(centre[:, 3]) / 2
        corners = self._to_input_pixels(
            np.stack(
                [
                    centre[:, 0] - half_w,
                    centre[:, 1] - half_h,
                    centre[:, 0] + half_w,
                    centre[:, 1] + half_h,
                ],
                axis=1,
            )
        )
        picked = _nms(corners, scores[keep], classes[keep], limits, self.spec.class_agnostic_nms)
        chosen = keep[picked]
        return corners[picked], classes[chosen].astype(np.int64), scores[chosen]

    def _to_input_pixels(self, corners: Floats) -> Floats:
        if self.spec.box_units is BoxUnits.PIXELS:
            return corners
        scale = np.array([self.input_width, self.input_height] * 2, dtype=np.float64)
        scaled: Floats = corners * scale
        return scaled


def _nms(
    corners: Floats,
    scores: Floats,
    classes: npt.NDArray[np.intp],
    limits: DetectionLimits,
    agnostic: bool,
) -> npt.NDArray[np.intp]:
    """Indices kept by OpenCV's greedy NMS, best first, at most ``max_objects``."""
    if len(corners) == 0:
        return np.zeros(0, dtype=np.intp)
    xywh = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
    # OpenCV's score test is strict (>), so only a score of exactly 0 is lost to it; its
    # top_k caps the candidates before suppression, not what is kept, hence the slice.
    if agnostic:
        kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.0, limits.iou_threshold)
    else:
        kept = cv2.dnn.NMSBoxesBatched(
            xywh.tolist(), scores.tolist(), classes.tolist(), 0.0, limits.iou_threshold
        )
    return np.asarray(kept, dtype=np.intp).reshape(-1)[: limits.max_objects]


def _bad(message: str) -> ModelError:
    return ModelError(f"detector output unusable: {message}", reason="bad_output")


def _require_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise _bad(f"{what} hold NaN or infinite values")


def _probabilities(values: np.ndarray, what: str) -> Floats:
    scores = np.asarray(values, dtype=np.float64)
    _require_finite(scores, what)
    if scores.size and (scores.min() < -_SCORE_SLACK or scores.max() > 1.0 + _SCORE_SLACK):
        raise _bad(
            f"{what} lie outside 0..1 (expected probabilities, not logits; if the model is "
            "no detector, set its preprocess spec's detection format to none)"
        )
    clipped: Floats = np.clip(scores, 0.0, 1.0)
    return clipped


# -- recognising a layout at load time ---------------------------------------------------


def resolve_detector(
    shapes: Sequence[tuple[int, ...]],
    spec: DetectionSpec | None,
    *,
    input_size: tuple[int, int],
    labels: Sequence[str] | None = None,
    op_positions: tuple[int, ...] | None = None,
) -> Detector | None:
    """The detector these output shapes make, or None (not a detector, or format ``none``).

    ``input_size`` is the model input's (width, height); ``op_positions`` where the outputs
    of the model's TFLite_Detection_PostProcess op sit, if it has one. An explicit format
    that the shapes do not fit raises :class:`ModelError` (``spec_mismatch``).
    """
    spec = spec or DetectionSpec()
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    if spec.format is DetectionFormat.NONE:
        return None
    if spec.format in (DetectionFormat.AUTO, DetectionFormat.TFLITE_POSTPROCESS):
        roles = _postprocess_roles(shapes, spec, op_positions)
        if roles is not None:
            return Detector(
                spec, DetectionFormat.TFLITE_POSTPROCESS, *input_size, shapes, roles=roles
            )
        if spec.format is DetectionFormat.TFLITE_POSTPROCESS:
            raise _mismatch(
                f"outputs {shapes} are not boxes (1, M, 4), classes (1, M), scores (1, M) "
                "and count (1,)"
            )
    yolo = _yolo_layout(shapes, spec, labels)
    if yolo is not None:
        transposed, objectness = yolo
        return Detector(
            spec,
            DetectionFormat.YOLO,
            *input_size,
            shapes,
            transposed=transposed,
            objectness=objectness,
        )
    if spec.format is DetectionFormat.YOLO:
        raise _mismatch(
            f"outputs {shapes} are not one YOLO table (1, anchors, 4 [+ 1] + classes) "
            "whose class count matches the labels"
        )
    return None


def _mismatch(message: str) -> ModelError:
    return ModelError(f"detection spec does not fit the model: {message}", reason="spec_mismatch")


def _postprocess_roles(
    shapes: tuple[tuple[int, ...], ...],
    spec: DetectionSpec,
    op_positions: tuple[int, ...] | None,
) -> tuple[int, int, int, int] | None:
    if len(shapes) != len(_ROLE_ORDER):
        return None
    if spec.outputs:
        by_role = {role: position for position, role in enumerate(spec.outputs)}
        candidate = tuple(by_role[role] for role in _ROLE_ORDER)
    elif op_positions is not None and len(op_positions) == len(_ROLE_ORDER):
        candidate = tuple(op_positions)
    else:
        # Without the op, roles by shape; the two (1, M) outputs in the op's order.
        boxes = [i for i, s in enumerate(shapes) if len(s) == 3 and s[2] == _BOX_SIDES]
        count = [i for i, s in enumerate(shapes) if int(np.prod(s)) == 1]
        rows = [i for i, s in enumerate(shapes) if len(s) == 2]
        if len(boxes) != 1 or len(count) != 1 or len(rows) != 2:
            return None
        candidate = (boxes[0], rows[0], rows[1], count[0])
    b, c, s, n = (shapes[i] for i in candidate)
    rows_ok = len(b) == 3 and b[0] == 1 and b[1] >= 1 and b[2] == _BOX_SIDES
    if not (rows_ok and c == b[:2] and s == b[:2] and int(np.prod(n)) == 1):
        return None
    return candidate  # type: ignore[return-value]


def _yolo_layout(
    shapes: tuple[tuple[int, ...], ...], spec: DetectionSpec, labels: Sequence[str] | None
) -> tuple[bool, bool] | None:
    """(transposed, objectness) of a single YOLO table, or None."""
    if len(shapes) != 1 or len(shapes[0]) != 3 or shapes[0][0] != 1:
        return None
    _, a, b = shapes[0]
    transposed = a < b
    anchors, attributes = (b, a) if transposed else (a, b)
    if anchors <= attributes:
        return None
    options = [spec.yolo_objectness] if spec.yolo_objectness is not None else []
    if not options and labels:
        options = [True, False]  # whichever the labels' count fits
    if not options:
        options = [not transposed]
    for objectness in options:
        classes = attributes - 4 - int(objectness)
        fits_labels = not labels or len(labels) - spec.label_offset == classes
        if classes >= 1 and fits_labels:
            return transposed, objectness
    return None
