"""Unit tests of :mod:`runtime.soups`' pure parts: the average, and the weights it takes."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import ModelError
from runtime.composition import Head
from runtime.soups import average_heads, make_soup


def test_a_weighted_average_is_layer_by_layer() -> None:
    first = Head("door", (np.ones((3, 2), np.float32), np.zeros(2, np.float32)), ("a", "b"))
    second = Head("door", (np.full((3, 2), 5, np.float32), np.ones(2, np.float32)), ("a", "b"))
    mixed = average_heads([first, second], [0.75, 0.25])
    np.testing.assert_allclose(mixed.weights[0], np.full((3, 2), 2.0))
    np.testing.assert_allclose(mixed.weights[1], np.full(2, 0.25))
    assert (mixed.name, mixed.labels) == ("door", ("a", "b"))


@pytest.mark.parametrize(
    ("weights", "greedy", "message"),
    [
        ([1.0], False, "2 weights of 0 or more expected"),
        ([1.0, -1.0], False, "2 weights of 0 or more expected"),
        ([0.0, 0.0], False, "the weights sum to 0"),
        ([1.0, 1.0], True, "a greedy soup chooses its own weights"),
    ],
)
def test_bad_weights_are_refused_before_any_model_is_read(
    weights: list[float], greedy: bool, message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        make_soup([b"", b""], lambda name: lambda head: 0.0, weights=weights, greedy=greedy)


def test_one_model_is_no_soup() -> None:
    with pytest.raises(ModelError, match="two models or more"):
        make_soup([b""], lambda name: lambda head: 0.0)
