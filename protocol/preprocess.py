"""The preprocessing spec: how a raw image becomes a model input.

It travels inside every model bundle, so training and serving see identical inputs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol.messages.base import Message

__all__ = ["ColorOrder", "InputDType", "Normalization", "PreprocessSpec", "ResizeMode"]


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
