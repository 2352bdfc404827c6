"""Figures of federated rounds as PNG files, drawn with matplotlib.

Only matplotlib's object-oriented API (``matplotlib.figure.Figure``), which renders on the Agg
canvas: pyplot would keep global state and pick a GUI backend whenever a display is around,
while this works the same on a headless Pi, in a thread and in a test. matplotlib is the
optional ``plot`` extra (part of ``train``), so it is imported only when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Reference", "RoundSeries", "accuracy_figure", "rounds_figure", "save_png"]

BYTES_PER_KB = 1000.0
PERCENT = 100.0
DPI = 120
# Hollow and different, so references at the same point (two Flower setups share their
# accuracy) stay visible on top of each other.
REFERENCE_MARKERS = ("D", "s", "^", "v", "o")


@dataclass(frozen=True)
class RoundSeries:
    """One configuration's per-round numbers; None where a round has no value."""

    label: str
    rounds: Sequence[int]
    accuracy: Sequence[float | None]  # fraction of the held-out set, 0..1
    seconds: Sequence[float | None]
    bytes_up: Sequence[float | None]  # per agent
    bytes_down: Sequence[float | None] = field(default_factory=list)  # per agent


@dataclass(frozen=True)
class Reference:
    """Another system's published numbers, drawn for comparison."""

    label: str
    accuracy: Mapping[int, float]  # round -> accuracy (0..1)
    round_s: float | None = None


def _new_figure(rows: int, *, height_in: float) -> tuple[Figure, list[Axes]]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            "figures need matplotlib: pip install 'fedge[plot]'", reason="missing_dependency"
        ) from exc
    figure = Figure(figsize=(8.0, height_in), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(visible=True, alpha=0.3)
    return figure, list(axes)


def _points(
    rounds: Sequence[int], values: Sequence[float | None], scale: float = 1.0
) -> tuple[list[int], list[float]]:
    pairs = [(r, v * scale) for r, v in zip(rounds, values, strict=False) if v is not None]
    return [r for r, _ in pairs], [v for _, v in pairs]


def _whole_rounds(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def accuracy_figure(
    rounds: Sequence[int],
    accuracy: Sequence[float | None],
    *,
    title: str,
    marks: Mapping[int, str] | None = None,
) -> Figure:
    """Accuracy (in %) against the round, round 0 being the initial model; ``marks`` puts a
    labelled vertical line at a round (an agent cut off, say)."""
    figure, (ax,) = _new_figure(1, height_in=4.5)
    xs, ys = _points(rounds, accuracy, PERCENT)
    ax.plot(xs, ys, marker="o", linewidth=2, label="global model")
    for number, text in (marks or {}).items():
        ax.axvline(number, color="tab:red", linestyle="--", linewidth=1, label=text)
    ax.set_title(title)
    ax.set_xlabel("round (0 = initial model)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, PERCENT)
    ax.set_xlim(left=0)
    _whole_rounds(ax)
    ax.legend(loc="lower right")
    return figure


def rounds_figure(
    series: Sequence[RoundSeries],
    *,
    title: str,
    references: Sequence[Reference] = (),
) -> Figure:
    """Three panels sharing the round axis: accuracy (%), bytes per agent (kB, up solid and
    down dashed) and round time (s, log scale), one colour per configuration. References
    appear as hollow markers at their checkpoints (accuracy, only within the rounds drawn)
    and as dotted lines (round time)."""
    figure, (acc, traffic, seconds) = _new_figure(3, height_in=10.0)
    last = max((max(one.rounds, default=0) for one in series), default=0)
    for index, one in enumerate(series):
        colour = f"C{index}"
        acc.plot(*_points(one.rounds, one.accuracy, PERCENT), color=colour, label=one.label)
        traffic.plot(*_points(one.rounds, one.bytes_up, 1 / BYTES_PER_KB), color=colour)
        if one.bytes_down:
            down = _points(one.rounds, one.bytes_down, 1 / BYTES_PER_KB)
            traffic.plot(*down, color=colour, linestyle="--")
        seconds.plot(*_points(one.rounds, one.seconds), color=colour)
    for index, ref in enumerate(references, start=len(series)):
        colour, marker = f"C{index}", REFERENCE_MARKERS[index % len(REFERENCE_MARKERS)]
        checkpoints = sorted((r, a) for r, a in ref.accuracy.items() if r <= last)
        if checkpoints:
            acc.plot(
                [r for r, _ in checkpoints],
                [a * PERCENT for _, a in checkpoints],
                linestyle="none",
                marker=marker,
                markersize=8,
                markerfacecolor="none",
                color=colour,
                label=ref.label,
            )
        if ref.round_s is not None:
            seconds.axhline(ref.round_s, color=colour, linestyle=":", label=ref.label)
    acc.set_title(title)
    acc.set_ylabel("held-out accuracy (%)")
    acc.set_ylim(0, PERCENT)
    acc.legend(fontsize="small", loc="lower right")
    traffic.set_ylabel("bytes per agent per round (kB)")
    traffic.set_ylim(bottom=0)
    # Colours are the configurations of the panel above; the line style tells the direction.
    traffic.plot([], [], color="grey", label="up: the agent's update")
    traffic.plot([], [], color="grey", linestyle="--", label="down: the release it trains from")
    traffic.legend(fontsize="small", loc="upper right")
    seconds.set_ylabel("round time (s, log scale)")
    seconds.set_yscale("log")
    _plain_numbers(seconds)
    if any(ref.round_s is not None for ref in references):
        seconds.legend(fontsize="small", loc="center right")
    seconds.set_xlabel("round")
    _whole_rounds(seconds)
    return figure


def _plain_numbers(ax: Axes) -> None:
    """Ticks at 1, 2 and 5 of each decade, written 0.5 and 20 rather than 5x10^-1 and 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
