"""Serving a release's own serving model: one ``.tflite``, one invoke per frame.

A transfer release carries serving variants composed by the coordinator (backbone, pooling
and head in one flatbuffer: :mod:`runtime.composition`); the agent hot-swaps one of them into
its pipeline instead of running the backbone and then the head. The labels and the
preprocessing spec are the release's, that is the task's, so serving sees exactly the inputs
training saw and results name the task's labels.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.model import ServingModel
from agent.runtime import TfliteModel
from protocol.errors import ModelError
from protocol.messages.rounds import BlobRef, ModelRelease, ModelVariant

__all__ = ["DEFAULT_VARIANT", "choose_variant", "release_serving_model"]

# The variant served unless the agent's configuration names another: the float model gives
# exactly the trained head's outputs.
DEFAULT_VARIANT = "float32"


def choose_variant(release: ModelRelease, name: str | None = None) -> ModelVariant | None:
    """The variant called ``name`` (else the default, else the first); None without any."""
    if not release.variants:
        return None
    wanted = name or DEFAULT_VARIANT
    for variant in release.variants:
        if variant.name == wanted:
            return variant
    if name is not None:
        known = ", ".join(v.name for v in release.variants)
        raise ModelError(
            f"release {release.version} has no variant {name!r} (it has {known})",
            reason="unknown_variant",
        )
    return release.variants[0]


def release_serving_model(
    release: ModelRelease,
    fetch: Callable[[BlobRef], bytes],
    *,
    variant: str | None = None,
    num_threads: int = 1,
) -> ServingModel | None:
    """The release's serving variant, loaded and checked; None when it carries none."""
    chosen = choose_variant(release, variant)
    if chosen is None:
        return None
    model = TfliteModel.from_bytes(fetch(chosen.blob), num_threads=num_threads)
    spec = release.preprocess
    expected = (spec.height, spec.width, spec.channels)
    if tuple(model.input_details.shape[1:]) != expected:
        raise ModelError(
            f"release {release.version}: variant {chosen.name} takes "
            f"{tuple(model.input_details.shape[1:])}, its preprocessing makes {expected}",
            reason="spec_mismatch",
        )
    outputs = model.output_details
    if len(outputs) != 1 or outputs[0].shape[-1] != len(release.labels):
        raise ModelError(
            f"release {release.version}: variant {chosen.name} gives "
            f"{[o.shape for o in outputs]} for {len(release.labels)} labels",
            reason="bad_labels",
        )
    return ServingModel(
        model=model,
        spec=spec,
        version=release.version,
        labels=release.labels,
        classifier=True,
    )
