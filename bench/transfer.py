"""A transfer task end to end: federated head training next to a centrally trained head.

    python bench/transfer.py [--agents 4] [--rounds 10] [--epochs 10] [--lr 0.1]
                             [--out bench/results/transfer.json]

The workload is :mod:`coordinator.transfer_workload` (scikit-learn's digits rendered as 64x64
colour frames; a backbone pretrained on the digits 0-4 only; the task is 5-9, split non-IID
over the agents). A fresh real Mosquitto on a free loopback port, N ``fedge agent run``
processes that cannot import TensorFlow, and a coordinator in this process run ``--rounds``
rounds plus one (whose updates evaluate the last round's model).

Printed side by side, per round: federated evaluation (agents' held-out splits), the central
test folder's accuracy of the round's head, and the same head trained centrally on the union
of the agents' training parts for as many epochs; bytes per agent per round, the head update
against a full-model update (backbone and head as float32); agent seconds (embedding a
share once, then one round of head training, measured in this process on the agents' code);
the served model's latency per frame: the release's one-invoke float32 and int8 models, and the
same head composed over the int8 backbone. Writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from agent.head import HeadTrainer
from agent.runtime import TfliteModel
from agent.training import TrainConfig
from agent.transfer_task import Backbone
from coordinator.rounds import RoundPlan
from coordinator.task_producers import head_initial_weights
from coordinator.transfer_workload import TASK_LABELS, write_transfer_workload
from coordinator.variants import quantize_int8
from fedge.harness.federation import federation
from fedge.harness.transfer_task import agents_data, central_head, folder_images
from protocol.messages.rounds import ModelRelease, RoundConfig, UpdateEncoding
from protocol.preprocess import PreprocessSpec
from protocol.topics import Topics
from protocol.updates import decode_weights
from runtime.composition import Head, compose
from runtime.mosquitto import MosquittoProcess, find_mosquitto

__all__ = ["main"]

DEFAULT_OUT = Path("bench/results/transfer.json")
EVAL_FRACTION = 0.2
LATENCY_INVOKES = 200
_SPEC = PreprocessSpec(height=64, width=64)


def _run_rounds(args: argparse.Namespace, workdir: Path, workload: Any) -> dict[str, Any]:
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto not found (apt install mosquitto)")
    topics = Topics(root=f"fedge-bench-{uuid.uuid4().hex[:8]}", fleet="bench")
    broker = MosquittoProcess(binary, workdir / "broker")
    broker.start()
    try:
        with federation(
            workdir / "federation",
            broker,
            topics,
            num_agents=args.agents,
            shares=workload.shares,
        ) as fed:
            coordinator = fed.start_coordinator(task=workload.task)
            fed.wait_for_agents(args.agents, timeout_s=600.0)
            started = time.monotonic()
            outcomes = coordinator.run_plan_now(
                RoundPlan(
                    rounds=args.rounds + 1,
                    min_agents=args.agents,
                    deadline_s=300.0,
                    config=RoundConfig(
                        epochs=args.epochs,
                        learning_rate=args.lr,
                        update_encoding=UpdateEncoding.FLOAT32,
                        eval_fraction=EVAL_FRACTION,
                        min_samples=4,
                    ),
                )
            )
            wall = time.monotonic() - started
            heads = []
            for number in range(args.rounds + 1):
                text = coordinator.state.release_json(f"r{number}")
                assert text is not None
                release = ModelRelease.model_validate_json(text)
                heads.append(decode_weights(coordinator.state.blob(release.weights.sha256)))
            data_dirs = [agent.data_dir for agent in fed.agents]
            crashed = [a.agent_id for a in fed.agents if "Traceback" in a.log()]
    finally:
        broker.stop()
    return {
        "outcomes": outcomes,
        "heads": heads,
        "data_dirs": data_dirs,
        "wall_s": wall,
        "crashed": crashed,
    }


def _agent_seconds(
    parts: list[Any], backbone: Backbone, images: np.ndarray, epochs: int
) -> dict[str, float]:
    """Embedding one agent's share once, then one round of head training, on the agents' code."""
    share = images[: max(len(p.train_y) + len(p.held_y) for p in parts)]
    began = time.perf_counter()
    backbone.embed(share)
    embed_s = time.perf_counter() - began
    biggest = max(parts, key=lambda p: len(p.train_y))
    head = HeadTrainer(head_initial_weights(backbone.feature_size, (), len(TASK_LABELS), seed=0))
    report = head.train(
        biggest.train_x, biggest.train_y, TrainConfig(epochs=epochs, learning_rate=0.1)
    )
    return {"embed_once_s": embed_s, "head_round_s": report.seconds, "samples": len(share)}


def _served_models(workload: Any, head: list[np.ndarray]) -> dict[str, bytes]:
    """The release's one-invoke serving models (as the coordinator composes them), and the
    same head over the int8 backbone."""
    task = Head("colour-digits", tuple(np.asarray(w, np.float32) for w in head), TASK_LABELS)
    float_model = compose(workload.backbone.read_bytes(), [task])
    return {
        "float32": float_model,
        "int8": quantize_int8(float_model).tflite,
        "int8_backbone": compose(workload.backbone_int8.read_bytes(), [task]),
    }


def _latency(tflite: bytes, frame: np.ndarray) -> float:
    """Median seconds per frame of a served model: one invoke, as the agent's pipeline calls it."""
    model = TfliteModel.from_bytes(tflite)
    times = []
    for _ in range(LATENCY_INVOKES):
        began = time.perf_counter()
        model.predict(frame)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedge-transfer-") as tmp:
        workdir = Path(tmp)
        print("writing the workload (pretraining the backbone on digits 0-4) ...", flush=True)
        workload = write_transfer_workload(workdir / "workload", args.agents)
        print(f"{args.rounds + 1} rounds with {args.agents} agents ...", flush=True)
        run = _run_rounds(args, workdir, workload)
        backbone = Backbone(workload.backbone.read_bytes())
        parts = agents_data(
            run["data_dirs"], backbone, labels=TASK_LABELS, spec=_SPEC, eval_fraction=EVAL_FRACTION
        )
        test_x, test_y = folder_images(workload.test, TASK_LABELS, _SPEC)
        test_features = backbone.embed(test_x)
        held_x = np.concatenate([p.held_x for p in parts])
        held_y = np.concatenate([p.held_y for p in parts])
        central = central_head(
            parts, classes=len(TASK_LABELS), epochs=args.rounds * args.epochs, learning_rate=args.lr
        )
        outcomes = run["outcomes"]
        rows = []
        for number in range(1, args.rounds + 1):
            head = HeadTrainer(run["heads"][number])
            reference = central[number * args.epochs - 1]
            rows.append(
                {
                    "round": number,
                    "federated_eval": outcomes[number].metrics.get("federated_accuracy"),
                    "central_folder": head.evaluate(test_features, test_y)[1],
                    "centralised_head_held_out": reference.evaluate(held_x, held_y)[1],
                    "centralised_head_folder": reference.evaluate(test_features, test_y)[1],
                    "bytes_up_per_agent": outcomes[number - 1].metrics["bytes_up"] / args.agents,
                    "bytes_down_per_agent": outcomes[number - 1].metrics["bytes_down_per_agent"],
                }
            )
        head_bytes = sum(w.nbytes for w in run["heads"][-1])
        full_bytes = workload.backbone.stat().st_size + head_bytes
        seconds = _agent_seconds(parts, backbone, test_x, args.epochs)
        served = _served_models(workload, run["heads"][-1])
        latency = {name: _latency(tflite, test_x[0]) for name, tflite in served.items()}
    print(
        f"\n{'round':>5} {'fed eval':>9} {'folder':>7} {'central held-out':>17} "
        f"{'central folder':>15} {'up B/agent':>11}"
    )
    for row in rows:
        fed = row["federated_eval"]
        print(
            f"{row['round']:>5} {fed if fed is None else round(fed, 3):>9} "
            f"{row['central_folder']:>7.3f} {row['centralised_head_held_out']:>17.3f} "
            f"{row['centralised_head_folder']:>15.3f} {row['bytes_up_per_agent']:>11.0f}"
        )
    print(
        f"\nupdate per agent per round: head {head_bytes} B vs full model {full_bytes} B "
        f"({full_bytes / head_bytes:.0f}x smaller)"
    )
    print(
        f"agent seconds: embedding {seconds['samples']} samples once "
        f"{seconds['embed_once_s']:.2f} s, then a round of head training "
        f"{seconds['head_round_s']:.3f} s"
    )
    print(
        f"served model per frame: float32 {latency['float32'] * 1e3:.2f} ms, "
        f"int8 {latency['int8'] * 1e3:.2f} ms "
        f"(int8/float32 {latency['int8'] / latency['float32']:.2f}x), "
        f"int8 backbone {latency['int8_backbone'] * 1e3:.2f} ms "
        f"(one .tflite each: backbone, pooling and head)"
    )
    print(f"rounds wall time {run['wall_s']:.1f} s; agents with tracebacks: {run['crashed']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": vars(args) | {"out": str(args.out), "eval_fraction": EVAL_FRACTION},
        "rounds": rows,
        "head_update_bytes": head_bytes,
        "full_model_bytes": full_bytes,
        "agent_seconds": seconds,
        "served_latency_s": latency,
        "rounds_wall_s": run["wall_s"],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
