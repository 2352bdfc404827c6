"""A release's model card: its variants with what the coordinator and the agents measured.

The release carries the coordinator's half (per variant: bytes, gzip bytes, sparsity,
parameters, accuracy on the central evaluation set). Agents serving the release add theirs
in their retained status (:class:`~protocol.messages.variants.VariantChoice`): invoke
latency p50/p95 and accuracy on their own samples, per variant they could run. The card
joins the two: agents' accuracy weighted by the samples each scored, latency as the
median over agents of each agent's p50 and p95, and how many agents serve each variant.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from protocol.messages.rounds import ModelRelease
from protocol.messages.variants import VariantChoice

__all__ = ["CardRow", "card_rows", "card_table_markdown"]


@dataclass(frozen=True, slots=True)
class CardRow:
    variant: str
    quantization: str
    size_bytes: int
    compressed_bytes: int
    sparsity: float
    parameters: int
    central_accuracy: float | None
    agents_accuracy: float | None
    agents_scored: int
    p50_ms: float | None
    p95_ms: float | None
    agents_measured: int
    agents_serving: int
    refused_by: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def card_rows(release: ModelRelease, choices: Iterable[VariantChoice]) -> list[CardRow]:
    """One row per variant of ``release``; ``choices`` of other releases are left out."""
    mine = [c for c in choices if c.version == release.version]
    rows = []
    for variant in release.variants:
        measures = [c.measured[variant.name] for c in mine if variant.name in c.measured]
        scored = [m for m in measures if m.accuracy is not None and m.evaluated_on > 0]
        weight = sum(m.evaluated_on for m in scored)
        rows.append(
            CardRow(
                variant=variant.name,
                quantization=variant.quantization,
                size_bytes=variant.blob.size_bytes,
                compressed_bytes=variant.compressed_bytes,
                sparsity=variant.sparsity,
                parameters=variant.parameters,
                central_accuracy=variant.accuracy,
                agents_accuracy=(
                    sum((m.accuracy or 0.0) * m.evaluated_on for m in scored) / weight
                    if weight
                    else None
                ),
                agents_scored=weight,
                p50_ms=_median([m.p50_ms for m in measures]),
                p95_ms=_median([m.p95_ms for m in measures]),
                agents_measured=len(measures),
                agents_serving=sum(c.chosen == variant.name for c in mine),
                refused_by=sum(variant.name in c.refused for c in mine),
            )
        )
    return rows


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def card_table_markdown(rows: Sequence[CardRow], *, first_column: str = "variant") -> str:
    """The card as a Markdown table (what README and the CLI show)."""
    header = [
        first_column,
        "bytes",
        "gzip bytes",
        "sparsity",
        "accuracy (central)",
        "accuracy (agents)",
        "invoke p50 / p95 ms",
        "agents serving",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            f"{row.variant} ({row.quantization})",
            f"{row.size_bytes:,}",
            f"{row.compressed_bytes:,}",
            f"{row.sparsity:.1%}",
            _num(row.central_accuracy, ".3f"),
            _num(row.agents_accuracy, ".3f"),
            f"{_num(row.p50_ms, '.3f')} / {_num(row.p95_ms, '.3f')}",
            f"{row.agents_serving} of {row.agents_measured}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
