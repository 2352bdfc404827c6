"""The activation ranges agents measure so the coordinator can calibrate int8 variants."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol.messages.base import Message

__all__ = ["ActivationRanges", "CalibrationSource", "TensorRange"]

# A quantiser's tensor names join the fused ops' names with ';': long, but bounded.
TensorName = Annotated[str, Field(min_length=1, max_length=512)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
# Enough for every activation of a camera-sized CNN; a larger table is refused unread.
MAX_RANGED_TENSORS = 4096
CalibrationSource = Literal["agents", "central", "dynamic"]


class TensorRange(Message):
    kind: Literal["tensor_range"] = "tensor_range"
    min: Finite
    max: Finite

    @model_validator(mode="after")
    def _ordered(self) -> TensorRange:
        if self.min > self.max:
            raise ValueError(f"range minimum {self.min} is above its maximum {self.max}")
        return self


class ActivationRanges(Message):
    """Min and max of every tensor of the float serving model over an agent's own samples.

    ``model_sha256`` names the float ``.tflite`` the ranges were measured on, so the
    coordinator never applies ranges of another architecture's tensors.
    """

    kind: Literal["activation_ranges"] = "activation_ranges"
    model_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    samples: Annotated[int, Field(ge=1)]
    tensors: Annotated[dict[TensorName, TensorRange], Field(max_length=MAX_RANGED_TENSORS)]
