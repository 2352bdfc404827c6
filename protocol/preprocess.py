"""The preprocessing spec: how a raw image becomes a model input.

It travels inside every model bundle, so training and serving see identical inputs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol.messages.base import Message

__all__ = [
    "BoxUnits",
    "ColorOrder",
    "DetectionFormat",
    "DetectionSpec",
    "InputDType",
    "Normalization",
    "OutputRole",
    "PreprocessSpec",
    "ResizeMode",
]


class ResizeMode(StrEnum):
    STRETCH = "stretch"  # resize to the input size, aspect ratio not kept
    LETTERBOX = "letterbox"  # keep aspect ratio, pad with `pad_value`


class ColorOrder(StrEnum):
    RGB = "rgb"
    BGR = "bgr"
    GRAY = "gray"


class Normalization(StrEnum):
    NONE = "none"  # raw 0..255 values
    SCALE = "scale"  # x * scale + offset
    ZSCORE = "zscore"  # (x / 255 - mean) / std, per channel
    MINMAX = "minmax"  # (x - min(x)) / (max(x) - min(x)) per image


class InputDType(StrEnum):
    FLOAT32 = "float32"
    UINT8 = "uint8"
    INT8 = "int8"


class DetectionFormat(StrEnum):
    AUTO = "auto"  # recognise the layouts below from the outputs' shapes, else no detection
    TFLITE_POSTPROCESS = "tflite_postprocess"  # boxes, classes, scores, count (SSD, EfficientDet)
    YOLO = "yolo"  # one output: per anchor a box, (objectness,) class scores
    NONE = "none"  # never decode boxes: classification or raw outputs as before


class BoxUnits(StrEnum):
    NORMALIZED = "normalized"  # 0..1 of the model input's sides
    PIXELS = "pixels"  # pixels of the model input


class OutputRole(StrEnum):
    BOXES = "boxes"
    CLASSES = "classes"
    SCORES = "scores"
    COUNT = "count"


Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class DetectionSpec(Message):
    """How a detector's outputs become objects; travels with the model like the rest.

    ``threshold``, ``max_objects`` and ``iou_threshold`` are defaults that a
    ``set_options`` command may override on one agent.
    """

    kind: Literal["detection_spec"] = "detection_spec"
    format: DetectionFormat = DetectionFormat.AUTO
    threshold: Unit = 0.25  # lowest score published
    max_objects: Annotated[int, Field(ge=1, le=1000)] = 25
    iou_threshold: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 0.45
    class_agnostic_nms: bool = False  # YOLO: one NMS over all classes, not one per class
    box_units: BoxUnits = BoxUnits.NORMALIZED
    # YOLO: None infers it from the layout, (1, anchors, 5 + C) has objectness (YOLOv5)
    # and (1, 4 + C, anchors) has none (YOLOv8 and later).
    yolo_objectness: bool | None = None
    # Added to a class index before looking up its label (1 for label maps whose first
    # line is the background, as TensorFlow's SSD examples ship).
    label_offset: Annotated[int, Field(ge=0, le=1000)] = 0
    # tflite_postprocess: the role of each output in order, when the model does not carry
    # the TFLite_Detection_PostProcess op to read them from.
    outputs: tuple[OutputRole, ...] = ()

    @model_validator(mode="after")
    def _check_outputs(self) -> DetectionSpec:
        if self.outputs and sorted(self.outputs) != sorted(OutputRole):
            raise ValueError("outputs must name boxes, classes, scores and count once each")
        return self


PositiveSide = Annotated[int, Field(ge=1, le=8192)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class PreprocessSpec(Message):
    """Everything needed to turn a decoded image into the model's input tensor."""

    kind: Literal["preprocess_spec"] = "preprocess_spec"
    height: PositiveSide
    width: PositiveSide
    color: ColorOrder = ColorOrder.RGB
    resize: ResizeMode = ResizeMode.STRETCH
    pad_value: Annotated[int, Field(ge=0, le=255)] = 0
    # Invert light/dark before normalising (digits are bright ink on dark in load_digits,
    # dark ink on light paper in photos).
    invert: bool = False
    normalization: Normalization = Normalization.SCALE
    scale: FiniteFloat = 1.0 / 255.0
    offset: FiniteFloat = 0.0
    mean: tuple[FiniteFloat, ...] = ()
    std: tuple[Annotated[float, Field(gt=0.0, allow_inf_nan=False)], ...] = ()
    # What the model's input tensor holds; quantisation parameters come from the model.
    dtype: InputDType = InputDType.FLOAT32
    # Detector outputs to objects; None is the same as DetectionSpec(): recognised by shape.
    detection: DetectionSpec | None = None

    @property
    def channels(self) -> int:
        return 1 if self.color is ColorOrder.GRAY else 3

    @model_validator(mode="after")
    def _check_zscore(self) -> PreprocessSpec:
        wrong_length = len(self.mean) != self.channels or len(self.std) != self.channels
        if self.normalization is Normalization.ZSCORE and wrong_length:
            msg = f"zscore needs {self.channels} mean and std values"
            raise ValueError(msg)
        return self
