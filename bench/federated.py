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
numbers with ratios, and PASS/FAIL lines for REFERENCE.md's targets; writes everything as
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coordinator.daemon import Coordinator
from coordinator.figures import Reference, RoundSeries, rounds_figure, save_png
from coordinator.rounds import RoundOutcome, RoundPlan
from fedge.harness.federation import federation
from protocol.chunks import CHUNK_HEADER_BYTES
from protocol.messages.rounds import (
    BlobRef,
    ModelRelease,
    RoundConfig,
    UpdateEncoding,
)
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

__all__ = ["main"]

_log = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench/results/federated.json")
CHECKPOINT_ROUNDS = (5, 10, 20, 30)
ROUND_DEADLINE_S = 120.0
AGENTS_ONLINE_TIMEOUT_S = 600.0
QUICK_AGENTS = 4
QUICK_ROUNDS = 5
BYTES_PER_KB = 1000.0
FLEET = "bench"

# REFERENCE.md's targets.
SERVER_OPTIMIZER_TARGET_ACCURACY = 0.95
MEDIAN_ROUND_TARGET_S = 1.0
MEDIAN_ROUND_TARGET_AGENTS = 10
COMPLETION_TARGET_AGENTS = 50
INT8_DOWN_TARGET_BYTES = 40_000
INT8_UP_TARGET_BYTES = 13_000
INT8_ACCURACY_TOLERANCE = 0.01
# int8 carries one byte per parameter against four, plus per-tensor scales and headers.
INT8_MIN_BYTE_REDUCTION = 3.5
# Different trainers (LiteRT here, Keras in Flower's clients) shuffle differently; the same
# maths should land within a few points at each checkpoint.
FLOWER_MATCH_TOLERANCE = 0.03


@dataclass(frozen=True, slots=True)
class FlowerReference:
    name: str
    agents: int | None
    accuracy: dict[int, float]
    median_round_s: float | None
    down_bytes: float | None
    up_bytes: float | None


FLOWER_DEPLOYMENT_N10 = FlowerReference(
    "Flower Deployment Engine N=10",
    10,
    {5: 0.476, 10: 0.687, 20: 0.867, 30: 0.878},
    89.0,
    48_000,
    81_000,
)
FLOWER_SIMULATION_N10 = FlowerReference(
    "Flower simulation N=10", 10, FLOWER_DEPLOYMENT_N10.accuracy, 5.8, None, None
)
FLOWER_SIMULATION_N50 = FlowerReference(
    "Flower simulation N=50",
    50,
    {5: 0.122, 10: 0.262, 20: 0.500, 30: 0.582},
    25.8,
    None,
    None,
)
CENTRALISED = FlowerReference(
    "centralised, 30 epochs",
    None,
    {5: 0.920, 10: 0.962, 20: 0.969, 30: 0.978},
    None,
    None,
    None,
)
FLOWER_REFERENCES = (
    FLOWER_DEPLOYMENT_N10,
    FLOWER_SIMULATION_N10,
    FLOWER_SIMULATION_N50,
    CENTRALISED,
)


@dataclass(frozen=True, slots=True)
class Spec:
    """One configuration of the workload."""

    agents: int
    encoding: UpdateEncoding
    strategy: str = "fedavg"
    eta: float | None = None

    @property
    def name(self) -> str:
        label = f"N={self.agents} {self.strategy} {self.encoding.value}"
        return label if self.eta is None else f"{label} eta={self.eta:g}"

    def plan(self, rounds: int) -> RoundPlan:
        return RoundPlan(
            rounds=rounds,
            min_agents=self.agents,
            deadline_s=ROUND_DEADLINE_S,
            strategy=self.strategy,
            strategy_options={} if self.eta is None else {"eta": self.eta},
            config=RoundConfig(update_encoding=self.encoding),
        )


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
    return result


# --- output ------------------------------------------------------------------------------


def _kb(value: float | None) -> str:
    return "-" if value is None else f"{value / BYTES_PER_KB:.1f}"


def _cell(spread: dict[str, float] | None, fmt: str, runs: int) -> str:
    if spread is None:
        return "-"
    text = format(spread["median"], fmt)
    if runs > 1:
        text += f" [{format(spread['min'], fmt)}-{format(spread['max'], fmt)}]"
    return text


def _round_table(spec: Spec, result: dict[str, Any], runs: int) -> str:
    header = f"{spec.name}: per round" + (
        f" (median [min-max] over {runs} runs)" if runs > 1 else " (1 run)"
    )
    lines = [
        header,
        f"{'round':>5}  {'accuracy':>18}  {'seconds':>18}  {'kB up/agent':>12}  "
        f"{'kB down/agent':>13}",
    ]
    for row in result["per_round"]:
        up = row["bytes_up_per_agent"]
        down = row["bytes_down_per_agent"]
        lines.append(
            f"{row['round']:>5}  {_cell(row['accuracy'], '.3f', runs):>18}  "
            f"{_cell(row['seconds'], '.2f', runs):>18}  "
            f"{_kb(up['median'] if up else None):>12}  "
            f"{_kb(down['median'] if down else None):>13}" + ("" if row["ok"] else "  FAILED")
        )
    lines.append("(round 1's bytes down include the one-time download of the trainable model)")
    return "\n".join(lines)


def _flower_for(agents: int) -> FlowerReference:
    return FLOWER_DEPLOYMENT_N10 if agents <= MEDIAN_ROUND_TARGET_AGENTS else FLOWER_SIMULATION_N50


def _accuracy_text(accuracy: dict[int, float]) -> str:
    return " / ".join(f"{accuracy[r]:.3f}" if r in accuracy else "  -  " for r in CHECKPOINT_ROUNDS)


def _summary_table(results: dict[str, dict[str, Any]], runs: int) -> str:
    lines = [
        f"summary (medians over {runs} run(s); "
        + ("rerun with --runs 3 for medians and spread" if runs == 1 else "spread in JSON")
        + ")",
        f"{'run':<34} {'acc r5 / r10 / r20 / r30':<31} {'median round s':>14} "
        f"{'rounds s':>8} {'total wall s':>12} {'kB down':>8} {'kB up':>7}",
    ]
    for name, result in results.items():
        s = result["summary"]
        lines.append(
            f"{name:<34} {_accuracy_text(s['accuracy']):<31} "
            f"{s['median_round_s']['median']:>14.2f} {s['rounds_wall_s']['median']:>8.1f} "
            f"{s['total_wall_s']['median']:>12.1f} "
            f"{_kb(s['down_bytes']['median']):>8} {_kb(s['up_bytes']['median']):>7}"
        )
    for ref in FLOWER_REFERENCES:
        round_s = "-" if ref.median_round_s is None else f"{ref.median_round_s:.1f}"
        lines.append(
            f"{ref.name:<34} {_accuracy_text(ref.accuracy):<31} {round_s:>14} {'-':>8} {'-':>12} "
            f"{_kb(ref.down_bytes):>8} {_kb(ref.up_bytes):>7}"
        )
    lines.append(
        "rounds s: all rounds' wall time; total wall s adds broker, agent and coordinator start-up"
    )
    lines.append(
        "kB down/up: per agent per round; down excludes round 1's one-time trainable model "
        "download (shown per round above)"
    )
    lines.append("")
    lines.append("ratios (Flower / fedge; above 1 favours fedge)")
    for name, result in results.items():
        s = result["summary"]
        ref = _flower_for(result["spec"]["agents"])
        parts = [f"{name:<34} vs {ref.name}:"]
        if ref.median_round_s is not None:
            parts.append(f"round time {ref.median_round_s / s['median_round_s']['median']:.0f}x")
        if ref is FLOWER_DEPLOYMENT_N10:
            parts.append(f"simulation round time {_SIM_N10_S / s['median_round_s']['median']:.1f}x")
        if ref.down_bytes is not None and ref.up_bytes is not None:
            parts.append(f"bytes down {ref.down_bytes / s['down_bytes']['median']:.2f}x")
            parts.append(f"bytes up {ref.up_bytes / s['up_bytes']['median']:.2f}x")
        if 30 in s["accuracy"]:
            parts.append(f"acc r30 {s['accuracy'][30] - ref.accuracy[30]:+.3f}")
        lines.append(" ".join(parts))
    return "\n".join(lines)


_SIM_N10_S = FLOWER_SIMULATION_N10.median_round_s or 1.0


# --- targets -----------------------------------------------------------------------------


Check = dict[str, str]


def _check(name: str, passed: bool | None, detail: str) -> Check:
    status = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
    return {"target": name, "status": status, "detail": detail}


def _find(
    results: dict[str, dict[str, Any]], agents: int, encoding: str, strategy: str = "fedavg"
) -> dict[str, Any] | None:
    for result in results.values():
        spec = result["spec"]
        if (spec["agents"], spec["encoding"], spec["strategy"]) == (agents, encoding, strategy):
            return result
    return None


def _final(result: dict[str, Any]) -> float:
    return float(result["summary"]["final_accuracy"]["median"])


def _flower_match(results: dict[str, dict[str, Any]], rounds: int) -> list[Check]:
    checks = []
    for agents, ref in ((10, FLOWER_DEPLOYMENT_N10), (50, FLOWER_SIMULATION_N50)):
        result = _find(results, agents, "float32")
        name = f"FedAvg N={agents} matches Flower's accuracy (within {FLOWER_MATCH_TOLERANCE})"
        if result is None or rounds < max(CHECKPOINT_ROUNDS):
            checks.append(
                _check(name, None, f"needs N={agents} and {max(CHECKPOINT_ROUNDS)} rounds")
            )
            continue
        ours = result["summary"]["accuracy"]
        diffs = {r: ours[r] - ref.accuracy[r] for r in CHECKPOINT_ROUNDS}
        # At least as good counts as matching: the target is not to fall short of Flower.
        passed = all(d >= -FLOWER_MATCH_TOLERANCE for d in diffs.values())
        detail = ", ".join(f"r{r} {ours[r]:.3f} vs {ref.accuracy[r]:.3f}" for r in diffs)
        best = max(r["accuracy"]["median"] for r in result["per_round"] if r["accuracy"])
        detail += f"; best round {best:.3f}"
        checks.append(_check(name, passed, detail))
    return checks


def _server_optimizer(results: dict[str, dict[str, Any]], rounds: int) -> Check:
    name = f"server optimiser reaches {SERVER_OPTIMIZER_TARGET_ACCURACY} by round 30"
    candidates = {n: r for n, r in results.items() if r["spec"]["eta"] is not None}
    if not candidates:
        return _check(name, None, "no server-optimiser run")
    best_name, best = max(candidates.items(), key=lambda item: _final(item[1]))
    tried = ", ".join(f"{n}: {_final(r):.3f}" for n, r in candidates.items())
    if rounds < max(CHECKPOINT_ROUNDS):
        return _check(name, None, f"only {rounds} rounds; {tried}")
    accuracy = _final(best)
    return _check(name, accuracy >= SERVER_OPTIMIZER_TARGET_ACCURACY, f"best {best_name}; {tried}")


def _median_round(results: dict[str, dict[str, Any]]) -> Check:
    name = f"median round under {MEDIAN_ROUND_TARGET_S:g} s at N={MEDIAN_ROUND_TARGET_AGENTS}"
    chosen = {
        n: r["summary"]["median_round_s"]["median"]
        for n, r in results.items()
        if r["spec"]["agents"] == MEDIAN_ROUND_TARGET_AGENTS
    }
    if not chosen:
        return _check(name, None, f"no N={MEDIAN_ROUND_TARGET_AGENTS} run")
    detail = ", ".join(f"{n}: {s:.2f} s" for n, s in chosen.items())
    return _check(name, all(s < MEDIAN_ROUND_TARGET_S for s in chosen.values()), detail)


def _completion(results: dict[str, dict[str, Any]], rounds: int) -> Check:
    name = f"N={COMPLETION_TARGET_AGENTS} completes 30 rounds"
    chosen = {n: r for n, r in results.items() if r["spec"]["agents"] == COMPLETION_TARGET_AGENTS}
    if not chosen or rounds < max(CHECKPOINT_ROUNDS):
        return _check(name, None, f"needs N={COMPLETION_TARGET_AGENTS} and 30 rounds")
    done = {n: bool(r["summary"]["completed"]) for n, r in chosen.items()}
    return _check(name, all(done.values()), ", ".join(f"{n}: {d}" for n, d in done.items()))


def _int8_checks(results: dict[str, dict[str, Any]]) -> list[Check]:
    checks = []
    for agents in sorted({r["spec"]["agents"] for r in results.values()}):
        int8 = _find(results, agents, "int8")
        float32 = _find(results, agents, "float32")
        if int8 is None:
            continue
        s = int8["summary"]
        down, up = s["down_bytes"]["median"], s["up_bytes"]["median"]
        checks.append(
            _check(
                f"int8 N={agents}: under {_kb(INT8_DOWN_TARGET_BYTES)} kB down per agent per round",
                down < INT8_DOWN_TARGET_BYTES,
                f"{_kb(down)} kB (round 1 with the trainable model: "
                f"{_kb(s['round1_down_bytes']['median'])} kB)",
            )
        )
        checks.append(
            _check(
                f"int8 N={agents}: under {_kb(INT8_UP_TARGET_BYTES)} kB up per agent per round",
                up < INT8_UP_TARGET_BYTES,
                f"{_kb(up)} kB",
            )
        )
        if float32 is None:
            continue
        gap = _final(float32) - _final(int8)
        checks.append(
            _check(
                f"int8 N={agents}: final accuracy within {INT8_ACCURACY_TOLERANCE:g} of float32",
                gap <= INT8_ACCURACY_TOLERANCE,
                f"int8 {_final(int8):.3f}, float32 {_final(float32):.3f}",
            )
        )
        float32_up = float32["summary"]["up_bytes"]["median"]
        ratio = float32_up / up
        checks.append(
            _check(
                f"int8 N={agents}: about 4x fewer bytes up (at least {INT8_MIN_BYTE_REDUCTION}x)",
                ratio >= INT8_MIN_BYTE_REDUCTION,
                f"{ratio:.2f}x ({_kb(float32_up)} kB -> {_kb(up)} kB)",
            )
        )
    return checks


def evaluate_targets(results: dict[str, dict[str, Any]], rounds: int) -> list[Check]:
    return [
        *_flower_match(results, rounds),
        _server_optimizer(results, rounds),
        _median_round(results),
        _completion(results, rounds),
        *_int8_checks(results),
    ]


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
    specs = [
        Spec(n, encoding)
        for n in agents
        for encoding in UpdateEncoding
        if encoding != UpdateEncoding.FLOAT16
    ]
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
        "wall_s": elapsed,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    figure = _figure(results, args.figure or args.out.with_suffix(".png"), args.rounds, args.runs)
    print(f"wrote {args.out} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
