"""Fixtures of the agent tests: scikit-image's photos, decoded once per module."""

from __future__ import annotations

import numpy as np
import pytest

from tests.agent.photos import _photo


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _photo("astronaut")


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return _photo("coffee")
