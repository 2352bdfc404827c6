"""Model merging: one multi-head model against the tasks' own models run in turn.

    python bench/merge.py [--frames 100] [--runs 5] [--out bench/results/merge.json]

Two backbones, each with two and with three task heads (Dense 64 relu then softmax over 3,
2 and 4 labels): the transfer workload's CNN at 64x64 (:mod:`coordinator.transfer_workload`'s
architecture) and a MobileNetV2 (alpha 0.35) feature map at 96x96. Latency does not depend on
the weights, so both are Keras's seeded initial weights: nothing is trained or downloaded.
For each, :func:`fedge.harness.merge_latency.measure_merge` composes every task's serving
model, merges them, checks the merged outputs equal the separate ones and times one invoke of
the merged model against the separate models in turn, frame by frame (LiteRT, one thread).
Prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedge.harness.merge_latency import MergeLatency, measure_merge, merge_backbones, task_heads

__all__ = ["main"]

DEFAULT_OUT = Path("bench/results/merge.json")


def _row(backbone: str, m: MergeLatency) -> str:
    return (
        f"| {backbone} | {m.tasks} | {m.merged_ms:.3f} ({m.merged_range_ms[0]:.3f}-"
        f"{m.merged_range_ms[1]:.3f}) | {m.separate_ms:.3f} ({m.separate_range_ms[0]:.3f}-"
        f"{m.separate_range_ms[1]:.3f}) | {m.speedup:.2f}x | {m.merged_bytes:,} / "
        f"{m.separate_bytes:,} | {m.max_abs_diff:.1e} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    rows = []
    for name, (tflite, side, features) in merge_backbones().items():
        frames = rng.uniform(0, 1, (args.frames, side, side, 3)).astype(np.float32)
        for count in (2, 3):
            measured = measure_merge(tflite, task_heads(features, count), frames, runs=args.runs)
            rows.append(_row(name, measured))
            results.append({"backbone": name, **measured.as_dict()})
    print(
        "| backbone | tasks | merged ms/frame (runs' range) | separate in turn ms/frame "
        "| speedup | bytes merged / separate | max abs diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"frames": args.frames, "runs": args.runs, "results": results}, indent=2)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
