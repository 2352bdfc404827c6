"""A model ready to serve: interpreter, labels, preprocessing spec and version together.

Swapping models is swapping one reference to a :class:`ServingModel`, so the inference
worker always sees a consistent set (never new weights with old labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from agent.detection import POSTPROCESS_OP, Detector, resolve_detector
from agent.postprocess import is_classifier
from agent.runtime import TfliteModel, load_labels
from protocol.errors import ModelError
from protocol.preprocess import ColorOrder, PreprocessSpec

__all__ = ["ServingModel", "default_spec_for", "load_serving_model"]

_RANK_NHWC = 4


@dataclass(frozen=True, slots=True)
class ServingModel:
    model: TfliteModel
    spec: PreprocessSpec
    version: str
    labels: tuple[str, ...] | None
    classifier: bool
    detector: Detector | None = None


def default_spec_for(model: TfliteModel) -> PreprocessSpec:
    """A spec from the input tensor alone: NHWC, 1 channel grey or 3 channels RGB, 0..1."""
    shape = model.input_details.shape
    if len(shape) != _RANK_NHWC or shape[3] not in {1, 3}:
        raise ModelError(
            f"cannot guess preprocessing for input shape {shape}: give a preprocess spec file",
            reason="unsupported_model",
        )
    color = ColorOrder.GRAY if shape[3] == 1 else ColorOrder.RGB
    return PreprocessSpec(height=shape[1], width=shape[2], color=color)


def load_serving_model(
    model_path: Path,
    *,
    version: str,
    labels_path: Path | None = None,
    preprocess_path: Path | None = None,
    num_threads: int = 1,
    runtime: str | None = None,
) -> ServingModel:
    model = TfliteModel.from_path(model_path, num_threads=num_threads, runtime=runtime)
    labels = load_labels(labels_path) if labels_path is not None else None
    if preprocess_path is not None:
        try:
            spec = PreprocessSpec.model_validate_json(preprocess_path.read_bytes())
        except (OSError, ValidationError) as exc:
            raise ModelError(f"cannot use preprocess spec {preprocess_path}: {exc}") from exc
    else:
        spec = default_spec_for(model)
    expected = (spec.height, spec.width, spec.channels)
    if tuple(model.input_details.shape[1:]) != expected:
        raise ModelError(
            f"preprocess spec gives {expected} but the model wants "
            f"{tuple(model.input_details.shape[1:])}",
            reason="spec_mismatch",
        )
    shapes = [info.shape for info in model.output_details]
    detector = resolve_detector(
        shapes,
        spec.detection,
        input_size=(spec.width, spec.height),
        labels=labels,
        op_positions=model.op_output_positions(POSTPROCESS_OP),
    )
    classifier = detector is None and is_classifier(model.output_details)
    if classifier and labels is not None and len(labels) != model.output_details[0].shape[-1]:
        raise ModelError(
            f"{len(labels)} labels for {model.output_details[0].shape[-1]} classes",
            reason="bad_labels",
        )
    return ServingModel(
        model=model,
        spec=spec,
        version=version,
        labels=labels,
        classifier=classifier,
        detector=detector,
    )
