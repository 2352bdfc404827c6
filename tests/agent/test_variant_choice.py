"""An agent's choice among a release's variants: by policy, measured here, refusals named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.variant_choice import choose_variant, pick
from coordinator.production import blob_ref
from coordinator.reference import digits_preprocess_spec, load_digits_split
from coordinator.tflite_export import ReferenceModels
from protocol.errors import ModelError
from protocol.messages.rounds import BlobRef, ModelRelease, ModelVariant
from protocol.messages.variants import VariantMeasure


def _measure(size: int, p50: float, accuracy: float | None) -> VariantMeasure:
    return VariantMeasure(size_bytes=size, p50_ms=p50, p95_ms=p50 * 2, invokes=8, accuracy=accuracy)


MEASURED = {
    "float32": _measure(37_000, 0.020, 0.95),
    "int8": _measure(13_000, 0.030, 0.945),
    "pruned": _measure(17_000, 0.015, 0.90),
}


def test_smallest_within_takes_the_smallest_close_enough_to_the_best() -> None:
    name, why = pick(MEASURED, (), policy="smallest_within", within_points=1.0)
    assert name == "int8"
    assert "smallest" in why
    assert "0.950" in why
    assert pick(MEASURED, (), policy="smallest_within", within_points=0.1)[0] == "float32"


def test_fastest_within_takes_the_lowest_median_latency_close_enough() -> None:
    assert pick(MEASURED, (), policy="fastest_within", within_points=1.0)[0] == "float32"
    assert pick(MEASURED, (), policy="fastest_within", within_points=6.0)[0] == "pruned"


def test_a_named_variant_is_served_and_a_missing_one_falls_back_with_a_reason() -> None:
    assert pick(MEASURED, (), policy="pruned", within_points=1.0)[0] == "pruned"
    name, why = pick(MEASURED, (), policy="int4", within_points=1.0)
    assert name == "int8"
    assert "no runnable variant 'int4'" in why


def _release(variants: tuple[ModelVariant, ...]) -> ModelRelease:
    ref = BlobRef(sha256="0" * 64, size_bytes=1, chunk_count=1, chunk_bytes=1)
    return ModelRelease(
        version="r3",
        model_name="digits_cnn",
        round=3,
        weights=ref,
        trainable=ref,
        labels=tuple(str(i) for i in range(10)),
        preprocess=digits_preprocess_spec(),
        variants=variants,
    )


def test_a_variant_the_device_cannot_run_is_refused_with_a_clear_error(
    reference_models: ReferenceModels,
) -> None:
    blobs = {
        "float32": reference_models.digits_float32.read_bytes(),
        "int8": reference_models.digits_int8.read_bytes(),
        # A file the runtime cannot load, as a device without an op would find it.
        "broken": Path(reference_models.labels).read_bytes() * 8,
    }
    refs = {
        name: blob_ref(data, content_type="application/vnd.tflite") for name, data in blobs.items()
    }
    by_hash = {refs[name].sha256: data for name, data in blobs.items()}
    release = _release(
        tuple(ModelVariant(name=name, blob=refs[name], quantization="float32") for name in blobs)
    )
    split = load_digits_split()
    errors: list[tuple[str, str]] = []
    picked = choose_variant(
        release,
        fetch=lambda ref: by_hash[ref.sha256],
        samples=(split.x_test[:40], split.y_test[:40]),
        policy="broken",
        report_error=lambda reason, message: errors.append((reason, message)),
    )
    assert set(picked.choice.measured) == {"float32", "int8"}
    assert "broken" in picked.choice.refused
    assert errors
    assert errors[0][0] == "variant_unsupported"
    assert "variant broken of r3 cannot run here" in errors[0][1]
    assert picked.choice.chosen in {"float32", "int8"}
    assert picked.choice.why.startswith("broken refused here")
    measure = picked.choice.measured["int8"]
    assert measure.evaluated_on == 40
    assert measure.accuracy is not None
    assert measure.accuracy > 0.8
    assert 0 < measure.p50_ms <= measure.p95_ms
    with pytest.raises(ModelError, match="no variant of r3 runs here"):
        choose_variant(
            _release(release.variants[2:]),
            fetch=lambda ref: by_hash[ref.sha256],
            samples=(split.x_test[:4], split.y_test[:4]),
        )
    assert np.isfinite(measure.p95_ms)
