"""Which of a release's serving variants this agent serves, and what it measured of each.

For a release with variants (float32, int8, pruned, ...) the agent loads every variant it
can run, times its invokes (one frame per invoke, as it serves) and scores it on its own
labelled samples, then picks by its policy:

- ``smallest_within`` (default): the smallest variant whose accuracy is within
  ``variant_within_points`` points of the best one's;
- ``fastest_within``: the same, but the lowest median invoke latency;
- a variant's name: that one.

Accuracy is the agent's own measurement where it has labelled samples, else the release's
(the coordinator's central evaluation). A variant that does not load here (an op the
runtime lacks, an input type it cannot feed) is refused with a reason, and an error event
says so; a named variant that is missing or refused falls back to the default policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np

from agent.runtime import TfliteModel
from protocol.errors import FedgeError, ModelError
from protocol.messages.rounds import BlobRef, ModelRelease, ModelVariant
from protocol.messages.variants import VariantChoice, VariantMeasure

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "VariantPick",
    "VariantPolicy",
    "choose_variant",
    "pick",
]

logger = logging.getLogger(__name__)

DEFAULT_POLICY: Final = "smallest_within"
POLICIES: Final = ("smallest_within", "fastest_within")
TIMED_INVOKES: Final = 64
SCORED_SAMPLES: Final = 512


@dataclass(frozen=True, slots=True)
class VariantPolicy:
    """An agent's configured policy (``variant``) and its margin (``variant_within_points``)."""

    policy: str = DEFAULT_POLICY
    within_points: float = 1.0


@dataclass(frozen=True, slots=True)
class VariantPick:
    model: TfliteModel
    choice: VariantChoice


Fetch = Callable[[BlobRef], bytes]
ReportError = Callable[[str, str], None]


def choose_variant(
    release: ModelRelease,
    *,
    fetch: Fetch,
    samples: tuple[np.ndarray, np.ndarray],
    policy: str = DEFAULT_POLICY,
    within_points: float = 1.0,
    num_threads: int = 1,
    report_error: ReportError | None = None,
) -> VariantPick:
    """Measure the release's variants here and load the one ``policy`` picks."""
    x, y = samples
    models: dict[str, TfliteModel] = {}
    measured: dict[str, VariantMeasure] = {}
    refused: dict[str, str] = {}
    for variant in release.variants:
        try:
            model = TfliteModel.from_bytes(fetch(variant.blob), num_threads=num_threads)
            measured[variant.name] = _measure(model, variant, x, y)
            models[variant.name] = model
        except FedgeError as exc:
            refused[variant.name] = str(exc)[:512]
            if report_error is not None:
                report_error(
                    "variant_unsupported",
                    f"variant {variant.name} of {release.version} cannot run here: {exc}",
                )
    if not models:
        raise ModelError(
            f"no variant of {release.version} runs here: {refused}", reason="variant_unsupported"
        )
    chosen, why = pick(measured, release.variants, policy=policy, within_points=within_points)
    if policy not in POLICIES and policy in refused:
        why = f"{policy} refused here ({refused[policy]}); {why}"
    choice = VariantChoice(
        version=release.version,
        chosen=chosen,
        policy=policy if policy in POLICIES else f"named:{policy}",
        why=why[:512],
        measured=measured,
        refused=refused,
    )
    logger.info("serving variant %s of %s: %s", chosen, release.version, why)
    return VariantPick(models[chosen], choice)


def pick(
    measured: dict[str, VariantMeasure],
    variants: tuple[ModelVariant, ...],
    *,
    policy: str,
    within_points: float,
) -> tuple[str, str]:
    """The variant's name and why, among ``measured`` (the ones that run here)."""
    if policy not in POLICIES:
        if policy in measured:
            return policy, f"named by the agent's config (variant = {policy!r})"
        names = ", ".join(sorted(measured))
        fallback, why = pick(measured, variants, policy=DEFAULT_POLICY, within_points=within_points)
        return fallback, f"no runnable variant {policy!r} (have {names}); {why}"
    central = {v.name: v.accuracy for v in variants}
    accuracy = {
        name: m.accuracy if m.accuracy is not None else central.get(name)
        for name, m in measured.items()
    }
    known = [a for a in accuracy.values() if a is not None]
    best = max(known) if known else None
    floor = -1.0 if best is None else best - within_points / 100.0 - 1e-9
    eligible = [name for name in measured if (accuracy[name] or 0.0) >= floor]
    if policy == "smallest_within":
        chosen = min(eligible, key=lambda n: (measured[n].size_bytes, n))
        what = f"smallest ({measured[chosen].size_bytes} bytes)"
    else:
        chosen = min(eligible, key=lambda n: (measured[n].p50_ms, n))
        what = f"fastest (p50 {measured[chosen].p50_ms:.3f} ms)"
    if best is None:
        return chosen, f"{what}; no accuracy known, so every variant qualified"
    return chosen, (
        f"{what} of {len(eligible)} within {within_points:g} points of the best "
        f"accuracy {best:.3f}: {accuracy[chosen] or 0.0:.3f}"
    )


def _measure(
    model: TfliteModel, variant: ModelVariant, x: np.ndarray, y: np.ndarray
) -> VariantMeasure:
    if len(x) == 0:
        probe = np.zeros((1, *model.input_details.shape[1:]), np.float32)
    else:
        probe = x[:TIMED_INVOKES]
    timings = []
    for i in range(TIMED_INVOKES):
        sample = probe[i % len(probe)][None]
        started = time.perf_counter()
        model.predict(sample)
        timings.append((time.perf_counter() - started) * 1000.0)
    accuracy = None
    scored = min(len(x), SCORED_SAMPLES)
    if scored:
        hits = sum(int(np.argmax(model.predict(x[i][None])[0]) == y[i]) for i in range(scored))
        accuracy = hits / scored
    return VariantMeasure(
        size_bytes=variant.blob.size_bytes,
        p50_ms=float(np.percentile(timings, 50)),
        p95_ms=float(np.percentile(timings, 95)),
        invokes=len(timings),
        accuracy=accuracy,
        evaluated_on=scored,
    )
