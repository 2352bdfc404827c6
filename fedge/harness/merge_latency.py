"""Merged against separate: the latency of one multi-head model next to its tasks in turn.

Used by ``bench/merge.py``; a function, so any other benchmark that reports merging (a model
card's) measures it the same way. For heads over one backbone, each task's own serving model
is composed (:func:`runtime.composition.compose`), the tasks are merged
(:func:`runtime.merging.merge_models`), and every frame goes through the merged model once
and through the separate models one after another, interleaved frame by frame so that load
on the machine falls on both alike. Latency is wall time of
:meth:`agent.runtime.TfliteModel.predict`, the call an agent's pipeline makes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agent.runtime import TfliteModel
from runtime.composition import Head, compose
from runtime.merging import merge_models

__all__ = ["MergeLatency", "measure_merge"]


@dataclass(frozen=True, slots=True)
class MergeLatency:
    """Per frame, medians over runs of each run's median; the spread is the runs' range."""

    tasks: int
    merged_bytes: int
    separate_bytes: int
    merged_ms: float
    separate_ms: float
    merged_range_ms: tuple[float, float]
    separate_range_ms: tuple[float, float]
    # Largest difference between a merged output and the same task's separate model.
    max_abs_diff: float
    frames: int
    runs: int

    @property
    def speedup(self) -> float:
        return self.separate_ms / self.merged_ms

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def measure_merge(
    backbone: bytes,
    heads: Sequence[Head],
    frames: np.ndarray,
    *,
    runs: int = 5,
    num_threads: int = 1,
) -> MergeLatency:
    """Compose each head's model, merge them, check the outputs agree and time both ways."""
    separate_models = [compose(backbone, [head]) for head in heads]
    merged_model = merge_models(separate_models)
    merged = TfliteModel.from_bytes(merged_model, num_threads=num_threads)
    separate = [TfliteModel.from_bytes(m, num_threads=num_threads) for m in separate_models]
    names = [o.name for o in merged.output_details]
    diff = 0.0
    for frame in frames[:16]:
        outputs = merged.predict(frame[np.newaxis])
        for head, model in zip(heads, separate, strict=True):
            (alone,) = model.predict(frame[np.newaxis])
            diff = max(diff, float(np.max(np.abs(outputs[names.index(head.name)] - alone))))
    merged.predict(frames[:1])  # warm both before timing
    for model in separate:
        model.predict(frames[:1])
    merged_runs, separate_runs = [], []
    for _ in range(runs):
        merged_ms, separate_ms = [], []
        for frame in frames:
            x = frame[np.newaxis]
            started = time.perf_counter()
            merged.predict(x)
            between = time.perf_counter()
            for model in separate:
                model.predict(x)
            ended = time.perf_counter()
            merged_ms.append((between - started) * 1e3)
            separate_ms.append((ended - between) * 1e3)
        merged_runs.append(statistics.median(merged_ms))
        separate_runs.append(statistics.median(separate_ms))
    return MergeLatency(
        tasks=len(heads),
        merged_bytes=len(merged_model),
        separate_bytes=sum(len(m) for m in separate_models),
        merged_ms=statistics.median(merged_runs),
        separate_ms=statistics.median(separate_runs),
        merged_range_ms=(min(merged_runs), max(merged_runs)),
        separate_range_ms=(min(separate_runs), max(separate_runs)),
        max_abs_diff=diff,
        frames=len(frames),
        runs=runs,
    )
