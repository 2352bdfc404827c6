"""A release's model card: the release's variants joined with what agents measured."""

from __future__ import annotations

from coordinator.model_card import card_rows, card_table_markdown
from coordinator.reference import digits_preprocess_spec
from protocol.messages.rounds import BlobRef, ModelRelease, ModelVariant
from protocol.messages.variants import VariantChoice, VariantMeasure


def _ref(size: int) -> BlobRef:
    return BlobRef(sha256=f"{size:064x}", size_bytes=size, chunk_count=1, chunk_bytes=size)


RELEASE = ModelRelease(
    version="r7",
    model_name="digits_cnn",
    round=7,
    weights=_ref(1),
    trainable=_ref(2),
    labels=tuple(str(i) for i in range(10)),
    preprocess=digits_preprocess_spec(),
    variants=(
        ModelVariant(
            name="float32",
            blob=_ref(37_576),
            quantization="float32",
            accuracy=0.95,
            compressed_bytes=17_000,
            sparsity=0.6,
        ),
        ModelVariant(
            name="int8",
            blob=_ref(13_304),
            quantization="int8_static",
            accuracy=0.94,
            compressed_bytes=7_000,
            sparsity=0.6,
        ),
    ),
)


def _choice(
    agent_p50: float, accuracy: float, samples: int, chosen: str, version: str = "r7"
) -> VariantChoice:
    measure = VariantMeasure(
        size_bytes=1,
        p50_ms=agent_p50,
        p95_ms=agent_p50 * 3,
        invokes=64,
        accuracy=accuracy,
        evaluated_on=samples,
    )
    return VariantChoice(
        version=version,
        chosen=chosen,
        policy="smallest_within",
        why="test",
        measured={"float32": measure, "int8": measure.model_copy(update={"p50_ms": agent_p50 / 2})},
        refused={},
    )


def test_agents_accuracy_is_weighted_by_samples_and_latency_is_the_median_agent() -> None:
    choices = [
        _choice(0.02, 1.0, 100, "int8"),
        _choice(0.04, 0.5, 300, "int8"),
        _choice(0.10, 0.9, 100, "float32"),
        _choice(9.0, 0.0, 1000, "float32", version="r6"),  # another release: left out
    ]
    rows = {row.variant: row for row in card_rows(RELEASE, choices)}
    f32, int8 = rows["float32"], rows["int8"]
    assert f32.agents_accuracy == (100 * 1.0 + 300 * 0.5 + 100 * 0.9) / 500
    assert f32.agents_scored == 500
    assert f32.p50_ms == 0.04
    assert f32.p95_ms == 0.04 * 3
    assert int8.p50_ms == 0.02
    assert (f32.agents_serving, int8.agents_serving) == (1, 2)
    assert f32.agents_measured == 3
    assert (f32.central_accuracy, f32.size_bytes, f32.compressed_bytes) == (0.95, 37_576, 17_000)
    table = card_table_markdown(list(rows.values()))
    assert "| int8 (int8_static) | 13,304 | 7,000 | 60.0% | 0.940 |" in table
    assert "2 of 3" in table


def test_a_release_no_agent_measured_yet_has_the_coordinators_half_only() -> None:
    (row, _) = card_rows(RELEASE, [])
    assert row.agents_accuracy is None
    assert row.p50_ms is None
    assert "| - / - |" in card_table_markdown([row])
