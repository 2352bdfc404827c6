"""Taking a composed serving model apart again, and merging composed models into one.

:func:`read_composed` reads the record :func:`runtime.composition.compose` leaves in a model
and gives back its backbone (the first operators, tensors and buffers, as they were) and its
heads (their float kernels and biases). :func:`merge_models` composes the heads of several
models over their one shared backbone: one invoke gives every task's output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import ModelError
from runtime.composition import (
    RECORD_NAME,
    RECORD_VERSION,
    Head,
    compose,
    flatbuffer_api,
    metadata_name,
    read_flatbuffer,
    tensor_map,
)

__all__ = ["Composed", "merge_models", "read_all", "read_composed", "without_record"]


@dataclass(frozen=True, slots=True)
class Composed:
    """What :func:`read_composed` finds in a composed model."""

    backbone_sha256: str
    backbone: bytes
    heads: tuple[Head, ...]


def read_composed(content: bytes) -> Composed:
    """The backbone and heads of a model :func:`compose` made; :class:`ModelError` otherwise."""
    schema, utils = flatbuffer_api()
    model = read_flatbuffer(content)
    record = _record(model)
    graph = model.subgraphs[0]
    heads = []
    try:
        for entry in record["heads"]:
            arrays = []
            for index in entry["weights"]:
                tensor = graph.tensors[int(index)]
                if tensor.type != schema.TensorType.FLOAT32:
                    raise ModelError(
                        "its heads are quantised: merge the float32 models", reason="quantised"
                    )
                data = np.asarray(model.buffers[tensor.buffer].data, np.uint8)
                array = data.view(np.float32).reshape([int(d) for d in tensor.shape])
                # TFLite keeps a kernel as (out, in); a head's weights are Keras's (in, out).
                arrays.append(array.T.copy() if array.ndim == 2 else array.copy())
            heads.append(Head(str(entry["name"]), tuple(arrays), tuple(entry["labels"])))
        sizes = record["backbone"]
        graph.operators = graph.operators[: int(sizes["operators"])]
        graph.tensors = graph.tensors[: int(sizes["tensors"])]
        model.buffers = model.buffers[: int(sizes["buffers"])]
        model.operatorCodes = model.operatorCodes[: int(sizes["operator_codes"])]
        graph.outputs = [int(o) for o in sizes.get("outputs", [sizes["output"]])]
        for signature in model.signatureDefs or []:
            if signature.subgraphIndex == 0:
                signature.outputs = [
                    tensor_map(str(name), int(index)) for name, index in sizes["signature_outputs"]
                ]
        sha = str(record["backbone_sha256"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelError(f"the model's composition record is broken: {exc}") from exc
    model.metadata = [m for m in model.metadata or [] if metadata_name(m) != RECORD_NAME]
    backbone = bytes(utils.convert_object_to_bytearray(model))
    return Composed(backbone_sha256=sha, backbone=backbone, heads=tuple(heads))


def read_all(models: Sequence[bytes], names: Sequence[str]) -> list[Composed]:
    """:func:`read_composed` of each model; an error names the model it is about."""
    parts = []
    for name, content in zip(names, models, strict=True):
        try:
            parts.append(read_composed(content))
        except ModelError as exc:
            raise ModelError(f"{name}: {exc}", reason=exc.reason) from exc
    return parts


def merge_models(models: Sequence[bytes], *, names: Sequence[str] = ()) -> bytes:
    """One multi-head model from composed models that share a backbone.

    ``names`` (one per model, when given) are what the models are called in errors.
    Raises :class:`ModelError` for a model that is not composed, for models whose backbones
    differ (reason ``no_shared_backbone``) and for two heads of the same name.
    """
    names = list(names) or [f"model {i + 1}" for i in range(len(models))]
    if len(models) < 2:
        raise ModelError("merging needs two models or more", reason="bad_merge")
    parts = read_all(models, names)
    shas = {part.backbone_sha256 for part in parts}
    if len(shas) > 1:
        which = ", ".join(
            f"{n} {p.backbone_sha256[:12]}" for n, p in zip(names, parts, strict=True)
        )
        raise ModelError(
            f"these models share no backbone (backbone sha256: {which})",
            reason="no_shared_backbone",
        )
    heads = [head for part in parts for head in part.heads]
    seen = [head.name for head in heads]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise ModelError(
            f"two heads are named {', '.join(repeated)}: the same task twice is not a "
            "multi-head merge",
            reason="bad_merge",
        )
    return compose(parts[0].backbone, heads, backbone_sha256=parts[0].backbone_sha256)


def without_record(content: bytes) -> bytes:
    """``content`` without its composition record: for a model changed after composing (a
    quantiser keeps metadata, but the record's weight tensors no longer hold float kernels)."""
    _, utils = flatbuffer_api()
    model = read_flatbuffer(content)
    kept = [m for m in model.metadata or [] if metadata_name(m) != RECORD_NAME]
    if len(kept) == len(model.metadata or []):
        return content
    model.metadata = kept or None
    return bytes(utils.convert_object_to_bytearray(model))


def _record(model: Any) -> dict[str, Any]:
    for entry in model.metadata or []:
        if metadata_name(entry) == RECORD_NAME:
            try:
                raw = bytes(np.asarray(model.buffers[entry.buffer].data, np.uint8))
                record = json.loads(raw)
            except (IndexError, TypeError, ValueError) as exc:
                raise ModelError(f"unreadable composition record: {exc}") from exc
            if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
                raise ModelError("a composition record of another version", reason="bad_model")
            return record
    raise ModelError(
        "not a serving model fedge composed (it has no composition record)",
        reason="not_composed",
    )
