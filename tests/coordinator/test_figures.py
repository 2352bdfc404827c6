"""Round figures: matplotlib on its Agg canvas, with axis titles and units."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib.lines import Line2D

from coordinator.figures import (
    DPI,
    Reference,
    RoundSeries,
    accuracy_figure,
    rounds_figure,
    save_png,
)
from protocol.errors import ConfigError

# From a demo run: round 4 failed (no accuracy) after an agent was cut off in round 3.
ROUNDS = [0, 1, 2, 3, 4, 5]
ACCURACY = [0.107, 0.42, 0.61, 0.7, None, 0.83]


def _x(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_xdata(), dtype=float)]


def _y(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_ydata(), dtype=float)]


def test_the_accuracy_figure_has_titles_units_and_the_measured_points(tmp_path: Path) -> None:
    figure = accuracy_figure(ROUNDS, ACCURACY, title="demo", marks={3: "agent-03 cut off"})
    (ax,) = figure.axes
    assert ax.get_title() == "demo"
    assert ax.get_xlabel() == "round (0 = initial model)"
    assert ax.get_ylabel() == "held-out accuracy (%)"
    assert ax.get_ylim() == (0.0, 100.0)
    curve, mark = ax.get_lines()
    assert _x(curve) == [0, 1, 2, 3, 5]  # the failed round has no point
    assert _y(curve) == pytest.approx([10.7, 42.0, 61.0, 70.0, 83.0])
    assert mark.get_label() == "agent-03 cut off"
    assert _x(mark) == [3, 3]
    path = save_png(figure, tmp_path / "out" / "accuracy.png")
    image = cv2.imread(str(path))
    assert image is not None
    width, height = figure.get_size_inches() * DPI
    assert image.shape == (round(height), round(width), 3)
    assert image.min() < 128 < image.max()  # something was drawn on the white page


def _series(label: str, scale: float) -> RoundSeries:
    return RoundSeries(
        label=label,
        rounds=[1, 2, 3],
        accuracy=[0.3, 0.5, 0.6],
        seconds=[0.5 * scale, 0.4 * scale, None],
        bytes_up=[35_500 / scale, 35_500 / scale, 35_500 / scale],
        bytes_down=[98_700, 35_500, 35_500],
    )


def test_the_rounds_figure_draws_accuracy_bytes_and_time_per_round() -> None:
    flower = Reference("Flower N=10", {2: 0.48, 10: 0.69}, round_s=89.0)
    figure = rounds_figure(
        [_series("float32", 1.0), _series("int8", 3.7)], title="bench", references=[flower]
    )
    accuracy, traffic, seconds = figure.axes
    assert accuracy.get_title() == "bench"
    assert accuracy.get_ylabel() == "held-out accuracy (%)"
    assert traffic.get_ylabel() == "bytes per agent per round (kB)"
    assert seconds.get_ylabel() == "round time (s, log scale)"
    assert seconds.get_xlabel() == "round"
    assert seconds.get_yscale() == "log"
    float32, int8, reference = accuracy.get_lines()
    assert float32.get_label() == "float32"
    assert _y(int8) == pytest.approx([30.0, 50.0, 60.0])
    # A reference checkpoint past the last round drawn would stretch the axis: left out.
    assert (_x(reference), reference.get_label()) == ([2], "Flower N=10")
    up, down, up8, _down8, *legend_only = traffic.get_lines()
    assert _y(up) == pytest.approx([35.5] * 3)
    assert _y(up8) == pytest.approx([35.5 / 3.7] * 3)
    assert _y(down) == pytest.approx([98.7, 35.5, 35.5])
    assert [str(line.get_label()).split(":")[0] for line in legend_only] == ["up", "down"]
    times = seconds.get_lines()
    assert _x(times[0]) == [1, 2]  # round 3 has no time
    assert _y(times[-1]) == [89.0, 89.0]


def test_a_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"fedge\[plot\]") as missing:
        accuracy_figure(ROUNDS, ACCURACY, title="demo")
    assert missing.value.reason == "missing_dependency"
