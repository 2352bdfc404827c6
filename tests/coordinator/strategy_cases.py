"""Models and updates the strategy tests aggregate, and what they inspect."""

from __future__ import annotations

import gc
import types
from collections.abc import Sequence

import numpy as np

from coordinator.strategies import (
    ClientUpdate,
    Strategy,
)

# Keras get_weights() order of a small conv net: kernel, bias, dense kernel, bias.
SHAPES = [(3, 3, 1, 4), (4,), (16, 10), (10,)]


def _model(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]


def _updates(
    rng: np.random.Generator, global_weights: Sequence[np.ndarray], count: int
) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            agent=f"agent-{i}",
            weights=[
                (w + rng.normal(scale=0.1, size=w.shape)).astype(np.float32) for w in global_weights
            ],
            num_examples=int(rng.integers(1, 200)),
        )
        for i in range(count)
    ]


def _aggregate(
    strategy: Strategy, global_weights: Sequence[np.ndarray], updates: Sequence[ClientUpdate]
) -> list[np.ndarray]:
    aggregation = strategy.begin(global_weights)
    for update in updates:
        aggregation.add(update)
    assert aggregation.count == len(updates)
    return aggregation.result()


def _scalars(*values: float) -> list[ClientUpdate]:
    """One update per value, a one-element model, equal weights."""
    return [
        ClientUpdate(agent=f"a{i}", weights=[np.array([v], np.float32)], num_examples=1)
        for i, v in enumerate(values)
    ]


def _arrays_reachable(root: object) -> list[np.ndarray]:
    """Every ndarray reachable from ``root`` through instances and containers."""
    skip = (type, types.ModuleType, types.BuiltinFunctionType)
    seen: set[int] = set()
    found: list[np.ndarray] = []
    stack: list[object] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            found.append(obj)
            continue
        if isinstance(obj, types.FunctionType):
            # what a closure holds, not the module globals every function can reach
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ())
            continue
        stack.extend(gc.get_referents(obj))
    return found
