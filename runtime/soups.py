"""Model soups: one model from several of the same task trained apart, by averaging weights.

Wortsman et al., "Model soups" (ICML 2022): models fine-tuned from one starting point can be
averaged weight for weight, and the average is often as accurate as the best of them or more.
Here the ingredients are composed serving models (:mod:`runtime.composition`) over one
backbone, so the soup averages their heads exactly and keeps the backbone as it is: the same
task trained by two fleets, or before and after. Two forms:

- weighted (uniform by default): every head the weighted mean of the ingredients' heads;
- greedy (the paper's recipe): ingredients sorted by their accuracy on the evaluation data,
  the best first; each next one stays in the (uniform) soup only when the soup's accuracy
  does not fall. Each task (head) of a multi-head model is souped on its own.

The guard: the soup is refused when any task's accuracy on the evaluation data falls more
than ``max_drop`` points below that task's best ingredient. A greedy soup never falls below
its first ingredient, so the guard refuses only weighted soups.

Accuracy is the caller's to measure (``evaluate``): this module does not run models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from protocol.errors import ModelError
from runtime.composition import Head, compose
from runtime.merging import Composed, read_all

__all__ = ["HeadSoup", "Soup", "average_heads", "make_soup"]

Evaluate = Callable[[Head], float]


@dataclass(frozen=True, slots=True)
class HeadSoup:
    """One task's soup: its ingredients' accuracies (0..1), which went in, and the soup's."""

    name: str
    ingredient_accuracy: tuple[float, ...]
    used: tuple[int, ...]
    accuracy: float

    @property
    def best(self) -> int:
        return int(np.argmax(self.ingredient_accuracy))

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.ingredient_accuracy[self.best] - self.accuracy)


@dataclass(frozen=True, slots=True)
class Soup:
    model: bytes
    heads: tuple[HeadSoup, ...]


def average_heads(heads: Sequence[Head], weights: Sequence[float]) -> Head:
    """The weighted mean of heads of one shape, layer by layer (``weights`` sum to 1)."""
    layers = zip(*(head.weights for head in heads), strict=True)
    mixed = tuple(
        np.sum(
            [w * np.asarray(a, np.float64) for w, a in zip(weights, arrays, strict=True)], 0
        ).astype(np.float32)
        for arrays in layers
    )
    return Head(heads[0].name, mixed, heads[0].labels)


def _check_same_task(parts: Sequence[Composed], names: Sequence[str]) -> None:
    """One backbone, and the same heads (names, labels, shapes) in every ingredient."""
    first = parts[0]
    for name, part in zip(names[1:], parts[1:], strict=True):
        if part.backbone_sha256 != first.backbone_sha256:
            raise ModelError(
                f"{name} has another backbone than {names[0]} (sha256 "
                f"{part.backbone_sha256[:12]}, not {first.backbone_sha256[:12]}): a soup "
                "averages heads over one backbone",
                reason="no_shared_backbone",
            )
        if [(h.name, h.labels) for h in part.heads] != [(h.name, h.labels) for h in first.heads]:
            raise ModelError(
                f"{name} is not the same task as {names[0]}: heads and labels "
                f"{_describe(part)} against {_describe(first)}",
                reason="different_task",
            )
        for head, ref in zip(part.heads, first.heads, strict=True):
            if [w.shape for w in head.weights] != [w.shape for w in ref.weights]:
                raise ModelError(
                    f"{name}: head {head.name}'s layers have other shapes than {names[0]}'s",
                    reason="different_task",
                )


def _describe(part: Composed) -> str:
    return "; ".join(f"{h.name}: {', '.join(h.labels) or '?'}" for h in part.heads)


def _greedy(heads: Sequence[Head], accuracy: Sequence[float], evaluate: Evaluate) -> HeadSoup:
    order = sorted(range(len(heads)), key=lambda i: -accuracy[i])
    used, best = [order[0]], accuracy[order[0]]
    for candidate in order[1:]:
        trial = [*used, candidate]
        score = evaluate(average_heads([heads[i] for i in trial], [1 / len(trial)] * len(trial)))
        if score >= best:
            used, best = trial, score
    return HeadSoup(heads[0].name, tuple(accuracy), tuple(sorted(used)), best)


def make_soup(
    models: Sequence[bytes],
    evaluate: Callable[[str], Evaluate],
    *,
    names: Sequence[str] = (),
    weights: Sequence[float] | None = None,
    greedy: bool = False,
    max_drop: float = 1.0,
) -> Soup:
    """The soup of ``models`` (composed, of one task), or :class:`ModelError` when refused.

    ``evaluate(head_name)`` gives the function that measures a head of that task on the
    evaluation data (accuracy 0..1). ``weights`` (one per model, at least 0, not all 0) are
    normalised; none is uniform. ``max_drop`` is in accuracy points.
    """
    names = list(names) or [f"model {i + 1}" for i in range(len(models))]
    if len(models) < 2:
        raise ModelError("a soup needs two models or more", reason="bad_soup")
    if greedy and weights is not None:
        raise ModelError("a greedy soup chooses its own weights: give --greedy or weights")
    if weights is not None:
        given = np.asarray(weights, np.float64)
        if len(given) != len(models) or not np.all(np.isfinite(given)) or np.any(given < 0):
            raise ModelError(f"{len(models)} weights of 0 or more expected, got {list(weights)}")
        if given.sum() <= 0:
            raise ModelError("the weights sum to 0")
        mix = list(given / given.sum())
    else:
        mix = [1 / len(models)] * len(models)
    parts = read_all(models, names)
    _check_same_task(parts, names)
    souped, reports = [], []
    for index, first in enumerate(parts[0].heads):
        heads = [part.heads[index] for part in parts]
        measure = evaluate(first.name)
        accuracy = [measure(head) for head in heads]
        if greedy:
            report = _greedy(heads, accuracy, measure)
            used = report.used
            head = average_heads([heads[i] for i in used], [1 / len(used)] * len(used))
        else:
            head = average_heads(heads, mix)
            used = tuple(i for i, w in enumerate(mix) if w > 0)
            report = HeadSoup(first.name, tuple(accuracy), used, measure(head))
        if report.drop_points > max_drop:
            raise ModelError(
                f"the soup is refused: task {first.name}'s accuracy falls {report.drop_points:.1f} "
                f"points (soup {100 * report.accuracy:.1f}%, {names[report.best]} "
                f"{100 * accuracy[report.best]:.1f}%), more than --max-drop {max_drop:g}; "
                "nothing written",
                reason="soup_refused",
            )
        souped.append(head)
        reports.append(report)
    model = compose(parts[0].backbone, souped, backbone_sha256=parts[0].backbone_sha256)
    return Soup(model, tuple(reports))
