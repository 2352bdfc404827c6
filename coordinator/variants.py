"""Serving variants of every release: the float32 model and its int8 quantisation.

int8 is static full-integer (weights and activations) through ``litert-quantizer``, which
quantises the float ``.tflite`` itself, needs no TensorFlow and is what Google now
recommends over quantising inside the TensorFlow converter. Its activation ranges come,
in order of preference, from the agents (ranges measured on their own samples and sent
with their updates, merged here: no image leaves an agent), from the coordinator's
central evaluation set when it has one, or from nowhere: then the variant is dynamic-range
int8 (int8 weights, float activations), which needs no calibration at all.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from coordinator.serving_files import activation_table
from coordinator.state import CoordinatorState
from protocol.errors import FedgeError, ModelError
from protocol.masks import sparsity
from protocol.messages.rounds import UpdateComplete
from protocol.messages.variants import ActivationRanges, CalibrationSource, TensorRange
from runtime.calibration import measure_activation_ranges, preserving_all_tensors

__all__ = [
    "Int8Variant",
    "merge_ranges",
    "merged_ranges_of_round",
    "note_ranges",
    "quantize_int8",
    "serving_variants",
    "tflite_accuracy",
]

logger = logging.getLogger(__name__)

CENTRAL_CALIBRATION_SAMPLES: Final = 256


@dataclass(frozen=True, slots=True)
class Int8Variant:
    tflite: bytes
    quantization: str  # "int8_static" | "int8_dynamic"
    calibration: CalibrationSource


def merge_ranges(ranges: Iterable[ActivationRanges]) -> ActivationRanges | None:
    """Elementwise min of minima and max of maxima over agents that measured the same model.

    Ranges measured on another model than the most common one are left out (an agent that
    calibrated a stale release); tensors some agent did not report are dropped, so the
    quantiser will refuse the table and the caller falls back.
    """
    pool = list(ranges)
    if not pool:
        return None
    models = [r.model_sha256 for r in pool]
    model = max(set(models), key=models.count)
    pool = [r for r in pool if r.model_sha256 == model]
    names = set(pool[0].tensors).intersection(*(r.tensors for r in pool[1:]))
    tensors = {
        name: TensorRange(
            min=min(r.tensors[name].min for r in pool), max=max(r.tensors[name].max for r in pool)
        )
        for name in sorted(names)
    }
    return ActivationRanges(
        model_sha256=model, samples=sum(r.samples for r in pool), tensors=tensors
    )


def note_ranges(state: CoordinatorState, complete: UpdateComplete) -> None:
    """Fold an accepted update's ranges into its round's merged table (kept in the state)."""
    if complete.activation_ranges is None:
        return
    key = f"activation_ranges_r{complete.round}"
    saved = state.get(key)
    pool = [complete.activation_ranges]
    if saved is not None:
        pool.append(ActivationRanges.model_validate_json(saved))
    merged = merge_ranges(pool)
    if merged is not None:
        state.put(key, merged.model_dump_json())


def merged_ranges_of_round(
    state: CoordinatorState, round_number: int, target: bytes
) -> ActivationRanges | None:
    """The round's merged agent ranges, carried onto ``target``'s tensor names."""
    saved = state.get(f"activation_ranges_r{round_number}")
    if saved is None:
        return None
    ranges = ActivationRanges.model_validate_json(saved)
    if ranges.model_sha256 == hashlib.sha256(target).hexdigest():
        return ranges
    try:
        measured_on = state.blob(ranges.model_sha256)
    except FedgeError:
        logger.warning("agents' ranges were measured on a model this state does not hold")
        return None
    return carried_over(ranges, measured_on, target)


def carried_over(
    ranges: ActivationRanges, measured_on: bytes, target: bytes
) -> ActivationRanges | None:
    """Agents measured the previous release's float model; the converter may name the new
    one's tensors differently (Keras numbers layers per process, and it folds zero biases of
    the initial weights away, which changes the constants). Ranges are of activations only,
    and the same architecture computes the same activations in the same order with the same
    shapes: map names by position among the activations."""
    old, new = activation_table(measured_on), activation_table(target)
    if [shape for _, shape in old] != [shape for _, shape in new]:
        logger.warning(
            "agents' ranges are of a model with other activations (%d vs %d)", len(old), len(new)
        )
        return None
    names = {o: n for (o, _), (n, _) in zip(old, new, strict=True)}
    tensors = {names[k]: v for k, v in ranges.tensors.items() if k in names}
    return ranges.model_copy(update={"tensors": tensors})


def quantize_int8(
    float_tflite: bytes,
    *,
    agent_ranges: ActivationRanges | None = None,
    central: npt.ArrayLike | None = None,
) -> Int8Variant:
    """The int8 variant of ``float_tflite`` from the best calibration at hand."""
    if agent_ranges is not None:
        try:
            data = _static(float_tflite, agent_ranges)
            return Int8Variant(data, "int8_static", "agents")
        except ModelError as exc:
            logger.warning("agents' activation ranges not usable (%s); falling back", exc)
    if central is not None and len(np.asarray(central)) > 0:
        ranges = measure_activation_ranges(float_tflite, central)
        return Int8Variant(_static(float_tflite, ranges), "int8_static", "central")
    return Int8Variant(_dynamic(float_tflite), "int8_dynamic", "dynamic")


def serving_variants(
    float_tflite: bytes,
    *,
    agent_ranges: ActivationRanges | None,
    eval_x: npt.ArrayLike,
    eval_y: npt.ArrayLike,
    central: bool,
    weights: Sequence[npt.ArrayLike] = (),
    sparse_tflite: bytes | None = None,
) -> list[tuple[dict[str, Any], bytes]]:
    """The release's serving variants: (fields of its ModelVariant but the blob, bytes).

    ``weights`` (the release's) give every variant its parameter count and sparsity; a
    pruned release also has ``sparse_tflite``, the variant ``pruned``: the same weights in
    TFLite's sparse storage.
    """
    x = np.asarray(eval_x, np.float32)
    calibration = x[:CENTRAL_CALIBRATION_SAMPLES] if central and len(x) else None
    int8 = quantize_int8(float_tflite, agent_ranges=agent_ranges, central=calibration)
    rows: list[tuple[str, bytes, str, CalibrationSource | None]] = [
        ("float32", float_tflite, "float32", None),
        ("int8", int8.tflite, int8.quantization, int8.calibration),
    ]
    if sparse_tflite is not None:
        rows.append(("pruned", sparse_tflite, "float32", None))
    out: list[tuple[dict[str, Any], bytes]] = []
    for name, data, quantization, source in rows:
        fields: dict[str, Any] = {
            "name": name,
            "quantization": quantization,
            "calibration": source,
            "sparsity": round(sparsity(weights), 6) if weights else 0.0,
            "parameters": sum(int(np.size(w)) for w in weights),
            "compressed_bytes": len(gzip.compress(data, compresslevel=9, mtime=0)),
            "evaluated_on": len(x),
            "accuracy": tflite_accuracy(data, x, eval_y) if len(x) else None,
        }
        out.append((fields, data))
    logger.info(
        "variants: int8 (%s, %s) %d bytes = %.2fx float32; accuracy %s vs %s",
        int8.quantization,
        int8.calibration,
        len(int8.tflite),
        len(int8.tflite) / len(float_tflite),
        out[1][0]["accuracy"],
        out[0][0]["accuracy"],
    )
    return out


def _static(float_tflite: bytes, ranges: ActivationRanges) -> bytes:
    from litert_quantizer import quantizer, recipe

    qsvs: dict[str, Any] = {
        name: {"min": np.float32(r.min), "max": np.float32(r.max)}
        for name, r in ranges.tensors.items()
    }
    q = quantizer.Quantizer(float_tflite)
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    try:
        with preserving_all_tensors():
            return bytes(q.quantize(qsvs, enable_progress_report=False).quantized_model)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"static int8 quantisation failed: {exc}", reason="quantize") from exc


def _dynamic(float_tflite: bytes) -> bytes:
    from litert_quantizer import quantizer, recipe

    q = quantizer.Quantizer(float_tflite)
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    return bytes(q.quantize(enable_progress_report=False).quantized_model)


def tflite_accuracy(tflite: bytes, x: npt.ArrayLike, y: Sequence[int] | npt.ArrayLike) -> float:
    """Top-1 accuracy of a classifier ``.tflite`` through LiteRT, one sample per invoke."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite)
    runner = interpreter.get_signature_runner()
    ((name, detail),) = runner.get_input_details().items()
    scale, zero = detail["quantization"]
    labels = np.asarray(y)
    hits = 0
    for sample, label in zip(np.asarray(x, np.float32), labels, strict=True):
        value = sample[None]
        if detail["dtype"] != np.float32:
            value = np.clip(np.rint(value / scale + zero), -128, 127).astype(detail["dtype"])
        (out,) = runner(**{name: value}).values()
        hits += int(np.argmax(out) == label)
    return hits / max(1, len(labels))
