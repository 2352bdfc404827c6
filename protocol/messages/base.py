"""The base every wire message shares: frozen, strict, no unknown fields, versioned."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SCHEMA_VERSION", "Id", "Message", "NonNegativeFloat", "ShortText"]

SCHEMA_VERSION = 1

# Same alphabet as topic levels, so an id in a message can always name a topic.
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
ShortText = Annotated[str, Field(max_length=1024)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class Message(BaseModel):
    """Base of every wire message; subclasses add a ``kind: Literal[...]`` discriminator."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    schema_version: Annotated[int, Field(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION
