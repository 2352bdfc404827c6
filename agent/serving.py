"""Serving a release's own serving model: one ``.tflite``, one invoke per frame.

A transfer release carries serving variants composed by the coordinator (backbone, pooling
and head in one flatbuffer: :mod:`runtime.composition`); the agent hot-swaps one of them into
its pipeline instead of running the backbone and then the head. The labels and the
preprocessing spec are the release's, that is the task's, so serving sees exactly the inputs
training saw and results name the task's labels.

The float32 variant is the backbone the agent already holds (fetched once, for training) with
the round's head appended, and composing is deterministic: so the agent composes it itself and
serves it when its sha256 is the one the signed release names, instead of downloading the
backbone's bytes again with every release. Any mismatch (another LiteRT version packs
differently, say) falls back to fetching the variant.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np

from agent.model import ServingModel
from agent.runtime import TfliteModel
from protocol.errors import FedgeError, ModelError
from protocol.messages.rounds import BlobRef, ModelRelease, ModelVariant
from protocol.updates import decode_weights

__all__ = ["DEFAULT_VARIANT", "choose_variant", "composed_here", "release_serving_model"]

# The variant served unless the agent's configuration names another: the float model gives
# exactly the trained head's outputs.
DEFAULT_VARIANT = "float32"

logger = logging.getLogger(__name__)


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
    content = composed_here(release, chosen, fetch) or fetch(chosen.blob)
    model = TfliteModel.from_bytes(content, num_threads=num_threads)
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


def composed_here(
    release: ModelRelease, variant: ModelVariant, fetch: Callable[[BlobRef], bytes]
) -> bytes | None:
    """``variant`` composed from the release's backbone and head, if it hashes as signed."""
    if release.recipe != "transfer" or variant.quantization != "float32":
        return None
    try:
        from runtime.composition import Head, compose

        weights = tuple(np.asarray(w, np.float32) for w in decode_weights(fetch(release.weights)))
        head = Head(release.model_name, weights, release.labels)
        content = compose(fetch(release.trainable), [head])
    except (ImportError, FedgeError) as exc:  # no schema (tflite-runtime), or no composition
        logger.info("serving model of %s not composed here: %s", release.version, exc)
        return None
    if hashlib.sha256(content).hexdigest() != variant.blob.sha256:
        logger.info("serving model of %s composed here differs; fetching it", release.version)
        return None
    return content
