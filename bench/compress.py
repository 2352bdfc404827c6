"""Compression: the model card of a dense and of a pruned federated run, side by side.

    python bench/compress.py [--agents 10] [--rounds 30] [--target 0.6] [--out ...]

Both runs are the reference digits workload through a fresh real Mosquitto with LiteRT-only
agent processes (N agents, non-IID Dirichlet split, FedAvg, SGD lr 0.05, batch 16): once
dense, once pruned on Zhu & Gupta's schedule to ``--target`` of every kernel (from round 2
to two thirds of the rounds). Every release carries float32 and int8 (calibrated from the
agents' activation ranges) and, pruned, ``pruned`` (TFLite sparse storage); agents measure
each variant's invoke latency and accuracy on their own samples and serve the one their
policy picks. Prints one model card table for both runs, the update bytes per agent in the
last round, where the int8 bytes go, then a merged two-task model (two heads over the
transfer workload's CNN backbone, :func:`fedge.harness.merge_latency.measure_merge`): one
invoke against the two tasks' own models in turn; and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.model_card import card_table_markdown
from coordinator.pruning import PruningSchedule
from fedge.harness.compression import CompressionRun, digits_plan, run_digits
from fedge.harness.merge_latency import measure_merge, merge_backbones, task_heads
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

__all__ = ["main"]

DEFAULT_OUT = Path("bench/results/compress.json")


def _run(
    workdir: Path, name: str, *, agents: int, rounds: int, pruning: PruningSchedule | None
) -> CompressionRun:
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto not found (apt install mosquitto)")
    broker = MosquittoProcess(binary, workdir / f"broker-{name}")
    broker.start()
    try:
        return run_digits(
            workdir / name,
            broker,
            Topics(root=f"fedge-compress-{uuid.uuid4().hex[:8]}", fleet="bench"),
            agents=agents,
            plan=digits_plan(rounds, agents=agents, pruning=pruning),
        )
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument(
        "--end-round", type=int, default=None, help="round the target is reached (2/3 of rounds)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(f"/tmp/fedge-compress-{uuid.uuid4().hex[:6]}")
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    schedule = PruningSchedule(
        target=args.target,
        start_round=min(2, args.rounds),
        end_round=args.end_round or max(2, args.rounds * 2 // 3),
    )
    runs: dict[str, CompressionRun] = {}
    seconds: dict[str, float] = {}
    for name, pruning in (("dense", None), ("pruned", schedule)):
        started = time.monotonic()
        runs[name] = _run(
            args.workdir, name, agents=args.agents, rounds=args.rounds, pruning=pruning
        )
        seconds[name] = time.monotonic() - started
    rows = [
        replace(row, variant=f"{name} {row.variant}")
        for name, run in runs.items()
        for row in run.card
    ]
    print(
        f"digits CNN, N={args.agents}, {args.rounds} rounds, LiteRT-only agents, Mosquitto; "
        f"pruned: {schedule.target:.0%} of every kernel, rounds {schedule.start_round}-"
        f"{schedule.end_round}\n"
    )
    print(card_table_markdown(rows, first_column="run, variant"))
    up = {
        name: run.rounds[-1]["bytes_up"] / max(1, run.rounds[-1]["updates"])
        for name, run in runs.items()
    }
    print(
        f"\nupdate bytes per agent, last round: dense {up['dense']:,.0f}, "
        f"pruned {up['pruned']:,.0f} ({up['pruned'] / up['dense']:.2f}x)"
    )
    backbone, side, features = merge_backbones()["workload CNN 64x64"]
    frames = np.random.default_rng(0).uniform(0, 1, (100, side, side, 3)).astype(np.float32)
    merged = measure_merge(backbone, task_heads(features, 2), frames)
    print(
        f"\nmerged two-task model (workload CNN 64x64, {merged.runs} runs of {merged.frames} "
        f"frames): one invoke {merged.merged_ms:.3f} ms against the two models in turn "
        f"{merged.separate_ms:.3f} ms ({merged.speedup:.2f}x), outputs differ by at most "
        f"{merged.max_abs_diff:.1e}"
    )
    result: dict[str, Any] = {
        "agents": args.agents,
        "rounds": args.rounds,
        "schedule": schedule.to_json(),
        "merged_two_tasks": merged.as_dict(),
        "runs": {
            name: {
                "seconds": seconds[name],
                "card": [row.to_json() for row in run.card],
                "accuracy_per_round": [r.get("accuracy") for r in run.rounds],
                "bytes_up_per_agent_last_round": up[name],
                "agent_logs_clean": run.agent_logs_clean,
            }
            for name, run in runs.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
