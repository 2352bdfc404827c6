"""Split learning (SplitFed v2) against FedAvg on the reference workload, side by side.

    python bench/parallel.py [--agents 4] [--rounds 10] [--out bench/results/parallel.json]
        [--search-agents 10] [--search-rounds 10] [--rung-rounds 3] [--only split|search]

Both run in one process, the agents' parts in LiteRT (the same trainable ``.tflite`` models an
agent runs), the server's in Keras; bytes are the sizes of the real payloads each would send
(split frames from :func:`protocol.split.split_messages`, weights from
:func:`protocol.tensors.encode_tensors`), not a broker's count. Per round: FedAvg trains each
agent's share for one local epoch and averages the weights by samples; split learning runs
every agent's batches through the shared upper part in turn, then averages the agents' lower
parts by samples (SplitFed's federation step). Agent seconds are the time spent in the
agents' LiteRT calls.

Then the hyper-parameter search against sequential trials (:mod:`fedge.harness.search_bench`):
four configurations (learning rate 0.05 or 0.2, one or two local epochs) on the reference
workload with agent processes through a real Mosquitto, each tried in turn on the whole
fleet, then searched by successive halving on disjoint groups at once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtime import load_interpreter_class
from coordinator.reference import build_reference_cnn, load_digits_split, non_iid_partition
from coordinator.split_model import UpperPart, export_lower_tflite, lower_weight_count
from coordinator.trainable import TRAINABLE_SIGNATURES, build_trainable_module
from coordinator.trainable_export import convert_module
from fedge.harness.search_bench import compare_search, search_table
from protocol.split import BatchId, split_messages
from protocol.tensors import encode_tensors
from protocol.topics import Topics

BATCH, CUT, LR = 16, 3, 0.05
DEFAULT_OUT = Path("bench/results/parallel.json")
TOPICS = Topics(fleet="bench")


def _interpreter(model: bytes) -> Any:
    return load_interpreter_class("litert").interpreter_class(model_content=model)


def _weights_bytes(weights: list[np.ndarray]) -> int:
    return len(encode_tensors({f"w{i}": w for i, w in enumerate(weights)}))


def _batches(x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    usable = len(x) - len(x) % BATCH
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, usable, BATCH)]


def _accuracy(model: Any, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    model.set_weights(weights)
    return float(np.mean(np.argmax(np.asarray(model(x)), axis=1) == y))


def _average(parts: list[list[np.ndarray]], sizes: list[int]) -> list[np.ndarray]:
    shares = np.asarray(sizes, np.float32) / sum(sizes)
    return [
        np.tensordot(shares, np.stack([p[i] for p in parts]), axes=1).astype(np.float32)
        for i in range(len(parts[0]))
    ]


def run_fedavg(
    shares: list[tuple[np.ndarray, np.ndarray]], rounds: int, test: Any
) -> list[dict[str, float]]:
    model = build_reference_cnn()
    flatbuffer = convert_module(
        build_trainable_module(model, batch_size=BATCH), TRAINABLE_SIGNATURES, "bench"
    )
    agents = [_interpreter(flatbuffer) for _ in shares]
    global_weights = [np.asarray(w, np.float32) for w in model.get_weights()]
    history = []
    for _round in range(rounds):
        parts, seconds = [], 0.0
        for interpreter, (x, y) in zip(agents, shares, strict=True):
            started = time.perf_counter()
            interpreter.get_signature_runner("set_weights")(
                **{f"w{i}": w for i, w in enumerate(global_weights)}
            )
            train = interpreter.get_signature_runner("train")
            for bx, by in _batches(x, y):
                train(
                    x=bx, y=by.astype(np.int32), mask=np.ones(BATCH, np.float32), lr=np.float32(LR)
                )
            out = interpreter.get_signature_runner("get_weights")()
            seconds += time.perf_counter() - started
            parts.append([out[f"w{i}"] for i in range(len(out))])
        global_weights = _average(parts, [len(x) for x, _y in shares])
        per_agent = 2 * _weights_bytes(global_weights)  # the release down, the update up
        accuracy = _accuracy(model, global_weights, *test)
        history.append(
            {"accuracy": accuracy, "bytes_per_agent": per_agent, "agent_seconds": seconds}
        )
    return history


def run_split(
    shares: list[tuple[np.ndarray, np.ndarray]], rounds: int, test: Any
) -> list[dict[str, float]]:
    model = build_reference_cnn()
    agents = [_interpreter(export_lower_tflite(model, CUT, batch_size=BATCH)) for _ in shares]
    upper = UpperPart(model, CUT, learning_rate=LR)
    lower_count = lower_weight_count(model, CUT)
    lower = [np.asarray(w, np.float32) for w in model.get_weights()[:lower_count]]
    history = []
    for round_number in range(1, rounds + 1):
        parts, seconds, traffic = [], 0.0, []
        for index, (interpreter, (x, y)) in enumerate(zip(agents, shares, strict=True)):
            interpreter.get_signature_runner("set_weights")(
                **{f"w{i}": w for i, w in enumerate(lower)}
            )
            forward = interpreter.get_signature_runner("forward")
            backward = interpreter.get_signature_runner("backward")
            sent = 2 * _weights_bytes(lower)  # the lower part down and up, once a round
            for step, (bx, by) in enumerate(_batches(x, y)):
                started = time.perf_counter()
                acts = forward(x=bx)["activations"]
                seconds += time.perf_counter() - started
                batch = BatchId(round_number, f"agent-{index}", step)
                up = split_messages(
                    TOPICS, batch, "up", {"activations": acts, "y": by.astype(np.float32)}
                )
                grad, weights, _loss = upper.step(acts, by.astype(np.float32))
                upper.apply(weights)
                down = split_messages(TOPICS, batch, "down", {"grad": grad})
                sent += sum(len(p) for _t, p in up + down)
                started = time.perf_counter()
                backward(x=bx, grad=grad, lr=np.float32(LR))
                seconds += time.perf_counter() - started
            out = interpreter.get_signature_runner("get_weights")()
            parts.append([out[f"w{i}"] for i in range(len(out))])
            traffic.append(sent)
        lower = _average(parts, [len(x) for x, _y in shares])
        accuracy = _accuracy(model, [*lower, *upper.weights()], *test)
        history.append(
            {
                "accuracy": accuracy,
                "bytes_per_agent": float(np.mean(traffic)),
                "agent_seconds": seconds,
            }
        )
    return history


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--search-agents", type=int, default=10)
    parser.add_argument("--search-rounds", type=int, default=10)
    parser.add_argument("--rung-rounds", type=int, default=3)
    parser.add_argument("--only", choices=["split", "search"], default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {"agents": args.agents}
    if args.only != "search":
        report |= _split_half(args)
    if args.only != "split":
        with tempfile.TemporaryDirectory(prefix="fedge-search-") as workdir:
            report["search"] = compare_search(
                Path(workdir),
                agents=args.search_agents,
                rounds=args.search_rounds,
                rung_rounds=args.rung_rounds,
            )
        print()
        print("\n".join(search_table(report["search"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def _split_half(args: argparse.Namespace) -> dict[str, Any]:
    split = load_digits_split()
    x_train = split.x_train.astype(np.float32)
    shares = [
        (x_train[idx], split.y_train[idx]) for idx in non_iid_partition(split.y_train, args.agents)
    ]
    test = (split.x_test.astype(np.float32), split.y_test)
    fedavg = run_fedavg(shares, args.rounds, test)
    splitfed = run_split(shares, args.rounds, test)
    print("round | FedAvg acc  bytes/agent  agent s | split acc  bytes/agent  agent s | bytes")
    for number, (f, s) in enumerate(zip(fedavg, splitfed, strict=True), start=1):
        ratio = s["bytes_per_agent"] / f["bytes_per_agent"]
        left = f"{f['accuracy']:>10.3f} {f['bytes_per_agent']:>12,.0f} {f['agent_seconds']:>8.2f}"
        right = f"{s['accuracy']:>9.3f} {s['bytes_per_agent']:>12,.0f} {s['agent_seconds']:>8.2f}"
        print(f"{number:>5} | {left} | {right} | {ratio:>4.1f}x")
    return {"fedavg": fedavg, "split": splitfed}


if __name__ == "__main__":
    main()
