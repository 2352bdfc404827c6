"""Federated evaluation: what an agent measured of a global model on its held-out split."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol.messages.base import Id, Message

__all__ = ["MAX_CONFUSION_CLASSES", "Evaluation"]

# A confusion matrix grows with the square of the classes; past this only counts travel.
MAX_CONFUSION_CLASSES = 64
Count = Annotated[int, Field(ge=0, le=10**9)]


class Evaluation(Message):
    """Loss, accuracy, per-class counts and the confusion matrix (rows: true, columns: predicted).

    ``model_version`` names the model evaluated: the global model the agent's round started
    from, on the agent's deterministic held-out split (samples never trained on).
    """

    kind: Literal["evaluation"] = "evaluation"
    model_version: Id
    num_examples: Annotated[int, Field(ge=1, le=10**9)]
    loss: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)]
    class_counts: Annotated[tuple[Count, ...], Field(min_length=1, max_length=1000)]
    confusion: Annotated[
        tuple[tuple[Count, ...], ...], Field(max_length=MAX_CONFUSION_CLASSES)
    ] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Evaluation:
        classes = len(self.class_counts)
        if sum(self.class_counts) != self.num_examples:
            msg = "class_counts must add up to num_examples"
            raise ValueError(msg)
        if self.confusion:
            if len(self.confusion) != classes or any(len(r) != classes for r in self.confusion):
                msg = f"confusion must be {classes}x{classes}"
                raise ValueError(msg)
            if tuple(sum(row) for row in self.confusion) != self.class_counts:
                msg = "confusion rows must add up to class_counts"
                raise ValueError(msg)
        return self
