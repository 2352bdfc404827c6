"""What agents measure of a release's variants: activation ranges for int8 calibration,
and each variant's invoke latency and accuracy on their own samples, with their choice."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol.messages.base import Message

__all__ = [
    "ActivationRanges",
    "CalibrationSource",
    "TensorRange",
    "VariantChoice",
    "VariantMeasure",
]

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


class VariantMeasure(Message):
    """What an agent measured of one variant of the release it serves, on its own samples."""

    kind: Literal["variant_measure"] = "variant_measure"
    size_bytes: Annotated[int, Field(ge=0)]
    p50_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    p95_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    invokes: Annotated[int, Field(ge=1)]
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    evaluated_on: Annotated[int, Field(ge=0)] = 0


class VariantChoice(Message):
    """Which variant an agent serves, by which policy and why; what it measured and refused."""

    kind: Literal["variant_choice"] = "variant_choice"
    version: Annotated[str, Field(min_length=1, max_length=128)]
    chosen: Annotated[str, Field(min_length=1, max_length=64)]
    policy: Annotated[str, Field(min_length=1, max_length=80)]
    why: Annotated[str, Field(max_length=512)]
    measured: Annotated[
        dict[Annotated[str, Field(min_length=1, max_length=64)], VariantMeasure],
        Field(max_length=32),
    ]
    refused: Annotated[
        dict[
            Annotated[str, Field(min_length=1, max_length=64)],
            Annotated[str, Field(max_length=512)],
        ],
        Field(max_length=32),
    ] = Field(default_factory=dict)
