"""REFERENCE.md's federated workload run end to end with fedge, next to Flower's numbers.

    python bench/federated.py [--quick] [--agents 10 50] [--rounds 30] [--runs 1]
                              [--server-strategy fedyogi] [--server-etas 0.01 0.03]
                              [--out bench/results/federated.json] [--figure PNG]

Every run is a fresh real Mosquitto on a free loopback port and a fresh federation: N
``fedge agent run`` processes (LiteRT trainer, TensorFlow blocked as on a Pi), each with its
share of the reference non-IID digits split imported into its sample store, and a
coordinator in this process. Configurations, each for every N of ``--agents``: FedAvg with
float32 updates and with int8 updates; for the smallest N also a server optimiser at each
``--server-etas`` value (the best one counts).

Per round: the global model's accuracy on the test part, the round's wall time, bytes up per
agent (update chunks as received) and bytes down per agent (the weights blob of the release
the round trains from plus one chunk header per chunk; round 1 also carries the one-time
download of the trainable model). Prints per-round tables, a summary next to Flower's
numbers with ratios, each configuration's round split into its phases (announce, fetch,
train, upload, validate and aggregate, evaluate, sign and release: medians over rounds, from
the timestamps the coordinator and the agents record; ``fedge.harness.phases``), and
PASS/FAIL lines for REFERENCE.md's targets; writes everything as
JSON and a per-round figure (accuracy, bytes, round time; needs matplotlib, the ``plot``
extra) next to it. With ``--runs`` above 1, values are medians over the runs with their
min-max spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from federated_report import (
    CHECKPOINT_ROUNDS,
    FLOWER_REFERENCES,
    Spec,
    _round_table,
    _summary_table,
    evaluate_targets,
)

from coordinator.daemon import Coordinator
from coordinator.figures import Reference, RoundSeries, rounds_figure, save_png
from coordinator.rounds import RoundOutcome
from fedge.harness.federation import federation
from fedge.harness.phases import phase_table, round_phases
from protocol.chunks import CHUNK_HEADER_BYTES
from protocol.messages.rounds import (
    BlobRef,
    ModelRelease,
    UpdateEncoding,
)
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

__all__ = ["main"]

_log = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench/results/federated.json")
ROUND_DEADLINE_S = 120.0
AGENTS_ONLINE_TIMEOUT_S = 600.0
QUICK_AGENTS = 4
QUICK_ROUNDS = 5
FLEET = "bench"


# --- one run -----------------------------------------------------------------------------


def _blob_wire_bytes(ref: BlobRef) -> int:
    return ref.size_bytes + ref.chunk_count * CHUNK_HEADER_BYTES


def _bytes_down(coordinator: Coordinator, outcome: RoundOutcome) -> int:
    """What one agent fetched for this round: the base release's weights (and trainable)."""
    record = coordinator.state.round(outcome.round)
    base = record.base_version if record is not None else f"r{outcome.round - 1}"
    text = coordinator.state.release_json(base)
    if text is None:
        raise RuntimeError(f"release {base} of round {outcome.round} is not in the state")
    release = ModelRelease.model_validate_json(text)
    down = _blob_wire_bytes(release.weights)
    if outcome.round == 1:
        down += _blob_wire_bytes(release.trainable)
    return down


def _round_rows(coordinator: Coordinator, outcomes: Sequence[RoundOutcome]) -> list[dict[str, Any]]:
    rows = []
    for outcome in outcomes:
        metrics = outcome.metrics
        record = coordinator.state.round(outcome.round)
        updates = int(metrics.get("updates", 0))
        rows.append(
            {
                "round": outcome.round,
                "ok": outcome.ok,
                "reason": outcome.reason,
                "accuracy": metrics.get("accuracy"),
                "loss": metrics.get("loss"),
                "seconds": metrics.get("seconds"),
                "updates": updates,
                "examples": metrics.get("examples"),
                "bytes_up_per_agent": metrics["bytes_up"] / updates if updates else None,
                "bytes_down_per_agent": _bytes_down(coordinator, outcome),
                # Secure aggregation's stage traffic and DP's epsilon (bench/privacy.py).
                "metrics": {k: v for k, v in metrics.items() if k.startswith(("secagg_", "dp_"))},
                "phases": round_phases(record.started_at, metrics) if record else None,
            }
        )
    return rows


def run_once(spec: Spec, rounds: int, workdir: Path) -> dict[str, Any]:
    """One fresh broker and federation; the per-round rows and the run's wall times."""
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto not found (apt install mosquitto)")
    topics = Topics(root=f"fedge-bench-{uuid.uuid4().hex[:8]}", fleet=FLEET)
    broker = MosquittoProcess(binary, workdir / "broker")
    started = time.monotonic()
    broker.start()
    try:
        with federation(
            workdir / "federation", broker, topics, num_agents=spec.agents, trainer="litert"
        ) as fed:
            coordinator = fed.start_coordinator()
            fed.wait_for_agents(spec.agents, timeout_s=AGENTS_ONLINE_TIMEOUT_S)
            ready = time.monotonic()
            outcomes = coordinator.run_plan_now(spec.plan(rounds))
            finished = time.monotonic()
            rows = _round_rows(coordinator, outcomes)
            crashed = [a.agent_id for a in fed.agents if "Traceback" in a.log()]
    finally:
        broker.stop()
    return {
        "rounds": rows,
        "startup_s": ready - started,
        "rounds_wall_s": finished - ready,
        "total_wall_s": time.monotonic() - started,
        "agents_with_tracebacks": crashed,
    }


# --- statistics --------------------------------------------------------------------------


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Median over runs with the spread (min-max)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _values(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key) is not None]


def _per_round(runs: Sequence[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    table = []
    for index in range(rounds):
        rows = [run["rounds"][index] for run in runs if index < len(run["rounds"])]
        entry: dict[str, Any] = {"round": index + 1, "ok": all(r["ok"] for r in rows)}
        for key in ("accuracy", "seconds", "bytes_up_per_agent", "bytes_down_per_agent"):
            values = _values(rows, key)
            entry[key] = _spread(values) if values else None
        table.append(entry)
    return table


def _median_round_s(run: dict[str, Any]) -> float:
    return statistics.median(_values(run["rounds"], "seconds"))


def _steady_down(run: dict[str, Any]) -> float:
    """Bytes down per agent per round, without round 1's one-time model download."""
    later = _values(run["rounds"][1:], "bytes_down_per_agent")
    return statistics.median(later or _values(run["rounds"], "bytes_down_per_agent"))


def _summarize(
    runs: Sequence[dict[str, Any]], per_round: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    accuracy = {
        r: per_round[r - 1]["accuracy"]["median"]
        for r in CHECKPOINT_ROUNDS
        if r <= len(per_round) and per_round[r - 1]["accuracy"] is not None
    }
    last = per_round[-1]["accuracy"] if per_round else None
    per_run: dict[str, Callable[[dict[str, Any]], float]] = {
        "median_round_s": _median_round_s,
        "rounds_wall_s": lambda run: float(run["rounds_wall_s"]),
        "total_wall_s": lambda run: float(run["total_wall_s"]),
        "startup_s": lambda run: float(run["startup_s"]),
        "down_bytes": _steady_down,
        "up_bytes": lambda run: statistics.median(_values(run["rounds"], "bytes_up_per_agent")),
        "round1_down_bytes": lambda run: float(run["rounds"][0]["bytes_down_per_agent"]),
    }
    summary: dict[str, Any] = {
        "accuracy": accuracy,
        "final_accuracy": last,
        "completed": all(
            len(run["rounds"]) == len(per_round) and all(r["ok"] for r in run["rounds"])
            for run in runs
        ),
    }
    for key, measure in per_run.items():
        summary[key] = _spread([measure(run) for run in runs])
    return summary


def measure(spec: Spec, rounds: int, runs: int) -> dict[str, Any]:
    results = []
    for run in range(runs):
        print(f"running {spec.name}, {rounds} rounds (run {run + 1}/{runs}) ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="fedge-bench-fl-") as tmp:
            results.append(run_once(spec, rounds, Path(tmp)))
    per_round = _per_round(results, rounds)
    result = {
        "spec": {**asdict(spec), "encoding": spec.encoding.value, "name": spec.name},
        "runs": results,
        "per_round": per_round,
        "summary": _summarize(results, per_round),
    }
    print(_round_table(spec, result, runs), flush=True)
    phases = [row.get("phases") for run in results for row in run["rounds"]]
    print(phase_table(phases, f"{spec.name}: a round's phases"), flush=True)
    return result


# --- main --------------------------------------------------------------------------------


def _median(spread: dict[str, float] | None) -> float | None:
    return None if spread is None else spread["median"]


def _figure(results: dict[str, dict[str, Any]], path: Path, rounds: int, runs: int) -> Path:
    """Accuracy, bytes per agent and round time per round, with Flower's published numbers."""
    series = []
    for name, result in results.items():
        table = result["per_round"]
        series.append(
            RoundSeries(
                label=f"fedge {name}",
                rounds=[entry["round"] for entry in table],
                accuracy=[_median(entry["accuracy"]) for entry in table],
                seconds=[_median(entry["seconds"]) for entry in table],
                bytes_up=[_median(entry["bytes_up_per_agent"]) for entry in table],
                bytes_down=[_median(entry["bytes_down_per_agent"]) for entry in table],
            )
        )
    measured = {result["spec"]["agents"] for result in results.values()}
    references = [
        Reference(ref.name, ref.accuracy, ref.median_round_s)
        for ref in FLOWER_REFERENCES
        if ref.agents is None or ref.agents in measured
    ]
    over = f", median of {runs} runs" if runs > 1 else ""
    title = f"reference federated workload, {rounds} rounds{over}"
    return save_png(rounds_figure(series, title=title, references=references), path)


def _specs(agents: Sequence[int], strategy: str, etas: Sequence[float]) -> list[Spec]:
    # The plain update encodings; masked ones belong to secure aggregation (bench/privacy.py).
    plain = (UpdateEncoding.FLOAT32, UpdateEncoding.INT8)
    specs = [Spec(n, encoding) for n in agents for encoding in plain]
    specs += [Spec(min(agents), UpdateEncoding.FLOAT32, strategy, eta) for eta in etas]
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 50], help="values of N")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    parser.add_argument("--runs", type=int, default=1, help="repetitions per configuration")
    parser.add_argument("--server-strategy", default="fedyogi", help="fedyogi or fedadam")
    parser.add_argument(
        "--server-etas", type=float, nargs="*", default=[0.01, 0.03], help="server step sizes"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"N={QUICK_AGENTS}, {QUICK_ROUNDS} rounds"
    )
    parser.add_argument(
        "--privacy", action="store_true", help="also bench/privacy.py's rows (secagg, DP)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument(
        "--figure", type=Path, help="per-round figure (PNG); default: --out with .png"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.agents, args.rounds = [QUICK_AGENTS], QUICK_ROUNDS
    if args.runs == 1:
        print("1 run per configuration (the default, to keep time sane): no spread; use --runs 3")
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for spec in _specs(args.agents, args.server_strategy, args.server_etas):
        results[spec.name] = measure(spec, args.rounds, args.runs)
    print()
    print(_summary_table(results, args.runs))
    checks = evaluate_targets(results, args.rounds)
    print()
    for check in checks:
        print(f"{check['status']}  {check['target']}: {check['detail']}")
    privacy = None
    if args.privacy:
        from privacy import privacy_rows, privacy_tables  # bench/privacy.py imports this module

        privacy = privacy_rows(
            secagg_agents=args.agents,
            secagg_rounds=10,
            dp_noise=(0.5, 1.0, 2.0),
            dp_rounds=args.rounds,
            distributed_noise=(1.0,),
        )
        print(f"\n{privacy_tables(privacy)}")
    elapsed = time.monotonic() - started
    print(f"\nbenchmark wall time {elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "agents": args.agents,
        "rounds": args.rounds,
        "runs": args.runs,
        "quick": args.quick,
        "results": results,
        "flower": [asdict(ref) for ref in FLOWER_REFERENCES],
        "checks": checks,
        "privacy": privacy,
        "wall_s": elapsed,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    figure = _figure(results, args.figure or args.out.with_suffix(".png"), args.rounds, args.runs)
    print(f"wrote {args.out} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
