"""Privacy on REFERENCE.md's workload: secure aggregation and DP-FedAvg next to plain FedAvg.

    python bench/privacy.py [--secagg-agents 10 50] [--secagg-rounds 10]
                            [--dp-noise 0.5 1 2] [--dp-rounds 30] [--distributed-noise 1]
                            [--out bench/results/privacy.json]

The same rows come with ``python bench/federated.py --privacy``. Same harness as
``bench/federated.py`` (a fresh Mosquitto, N ``fedge agent run`` processes training with
LiteRT, the coordinator in this process), same data and model. Rows:

- secure aggregation at each N of ``--secagg-agents`` (threshold 3, degree 6, clip range
  0.5, 2^20 levels) against plain FedAvg float32 in the same run of this script: bytes per
  agent per round up (masked upload plus the agent's keys, sealed shares and revealed
  shares, as the coordinator received them) and down (the weights, plus the key directory,
  the agent's share inbox and the unmask request, as published), and the median round time;
- DP-FedAvg (N=10, clip norm 0.5, fixed clipping) at each ``--dp-noise`` multiplier, and
  DP under secure aggregation (the agents' distributed noise, threshold 3) at each
  ``--distributed-noise``: the accuracy per round and the epsilon the coordinator reported
  at the last round (delta 1e-5, no amplification).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federated import ROUND_DEADLINE_S, run_once

from coordinator.dp import DpOptions
from coordinator.rounds import RoundPlan
from protocol.messages.secagg import SecAggParams

__all__ = ["privacy_rows", "privacy_tables"]

SECAGG = SecAggParams(
    threshold=3, degree=6, clip_range=0.5, quantisation_levels=2**20, stage_deadline_s=30.0
)
DP_AGENTS = 10
DP_CLIP_NORM = 0.5
DP_DELTA = 1e-5
CHECKPOINTS = (5, 10, 20, 30)


@dataclass(frozen=True, slots=True)
class PrivacySpec:
    agents: int
    secure: bool = False
    noise: float | None = None

    @property
    def name(self) -> str:
        label = f"N={self.agents} fedavg {'secagg' if self.secure else 'float32'}"
        return label if self.noise is None else f"{label} DP z={self.noise:g}"

    def plan(self, rounds: int) -> RoundPlan:
        privacy = None
        if self.noise is not None:
            privacy = DpOptions(noise_multiplier=self.noise, clip_norm=DP_CLIP_NORM, delta=DP_DELTA)
        return RoundPlan(
            rounds=rounds,
            min_agents=self.agents,
            deadline_s=ROUND_DEADLINE_S,
            privacy=privacy,
            secure_aggregation=SECAGG if self.secure else None,
        )


def _per_agent(row: dict[str, Any], direction: str) -> float | None:
    """Bytes one agent sent (``up``) or received (``down``) in a round, stages included."""
    metrics = row.get("metrics") or {}
    dropped = ("secagg_dropped_keys", "secagg_dropped_shares", "secagg_dropped_upload")
    agents = row["updates"] + sum(metrics.get(k, 0) for k in dropped)
    if direction == "up":
        if row["bytes_up_per_agent"] is None:
            return None
        stages = metrics.get("secagg_stage_bytes_up", 0) / max(agents, 1)
        return float(row["bytes_up_per_agent"] + stages)
    stages = metrics.get("secagg_stage_bytes_down", 0) / max(agents, 1)
    return float(row["bytes_down_per_agent"] + stages)


def _run(spec: PrivacySpec, rounds: int, root: Path) -> dict[str, Any]:
    print(f"running {spec.name}, {rounds} rounds ...", flush=True)
    workdir = root / f"{len(list(root.iterdir())):02d}-{spec.name.replace(' ', '_')}"
    run = run_once(spec, rounds, workdir)  # type: ignore[arg-type]
    rows = run["rounds"]
    ok = [r for r in rows if r["ok"]]
    seconds = [r["seconds"] for r in ok if r["seconds"] is not None]
    up = [b for b in (_per_agent(r, "up") for r in ok) if b is not None]
    # Round 1 also carries the one-time trainable model: leave it out of the steady figure.
    down = [_per_agent(r, "down") for r in ok[1:] or ok]
    epsilons = [(r.get("metrics") or {}).get("dp_epsilon") for r in ok]
    return {
        "name": spec.name,
        "rounds": rows,
        "median_round_s": statistics.median(seconds) if seconds else None,
        "bytes_up_per_agent": statistics.median(up) if up else None,
        "bytes_down_per_agent": statistics.median(b for b in down if b is not None)
        if down
        else None,
        "accuracy": [r["accuracy"] for r in rows],
        "epsilon": epsilons[-1] if epsilons else None,
        "failed": [r["reason"] for r in rows if not r["ok"]],
        "rounds_wall_s": run["rounds_wall_s"],
    }


def privacy_rows(
    *,
    secagg_agents: Sequence[int],
    secagg_rounds: int,
    dp_noise: Sequence[float],
    dp_rounds: int,
    distributed_noise: Sequence[float] = (),
) -> dict[str, Any]:
    """Run every privacy configuration; the results :func:`privacy_tables` prints."""
    results: dict[str, Any] = {"secagg": [], "dp": []}
    with tempfile.TemporaryDirectory(prefix="fedge-privacy-") as tmp:
        root = Path(tmp)
        for agents in secagg_agents:
            plain = _run(PrivacySpec(agents), secagg_rounds, root)
            secure = _run(PrivacySpec(agents, secure=True), secagg_rounds, root)
            results["secagg"].append({"agents": agents, "plain": plain, "secure": secure})
        if dp_noise or distributed_noise:
            results["dp"].append(_run(PrivacySpec(DP_AGENTS), dp_rounds, root))
        for noise in dp_noise:
            results["dp"].append(_run(PrivacySpec(DP_AGENTS, noise=noise), dp_rounds, root))
        for noise in distributed_noise:
            spec = PrivacySpec(DP_AGENTS, secure=True, noise=noise)
            results["dp"].append(_run(spec, dp_rounds, root))
    return results


def privacy_tables(results: dict[str, Any]) -> str:
    lines = [
        "secure aggregation vs plain FedAvg (same run; bytes per agent per round, "
        "secagg including keys and shares)",
        "| N, rounds | up plain / secagg | ratio | down plain / secagg | "
        "median round plain / secagg | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["secagg"]:
        p, s = row["plain"], row["secure"]
        up = (s["bytes_up_per_agent"] or 0) / (p["bytes_up_per_agent"] or 1)
        rt = (s["median_round_s"] or 0) / (p["median_round_s"] or 1)
        failed = f" ({len(s['failed'])} failed)" if s["failed"] else ""
        lines.append(
            f"| {row['agents']}, {len(s['rounds'])}{failed} | {p['bytes_up_per_agent'] or 0:,.0f} "
            f"/ {s['bytes_up_per_agent'] or 0:,.0f} B | {up:.2f}x | "
            f"{p['bytes_down_per_agent'] or 0:,.0f} / {s['bytes_down_per_agent'] or 0:,.0f} B | "
            f"{p['median_round_s'] or 0:.2f} / {s['median_round_s'] or 0:.2f} s | {rt:.1f}x |"
        )
    lines += [
        "",
        f"DP-FedAvg, N={DP_AGENTS}, clip norm {DP_CLIP_NORM}, "
        "accuracy r5 / r10 / r20 / r30, epsilon at the last round (delta 1e-5)",
        "| run | accuracy | epsilon |",
        "| --- | --- | --- |",
    ]
    for run in results["dp"]:
        acc = run["accuracy"]
        picks = [acc[i - 1] for i in CHECKPOINTS if i <= len(acc) and acc[i - 1] is not None]
        eps = "-" if run["epsilon"] is None else f"{run['epsilon']:.1f}"
        lines.append(f"| {run['name']} | {' / '.join(f'{a:.3f}' for a in picks)} | {eps} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secagg-agents", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--secagg-rounds", type=int, default=10)
    parser.add_argument("--dp-noise", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    parser.add_argument("--dp-rounds", type=int, default=30)
    parser.add_argument("--distributed-noise", type=float, nargs="*", default=[1.0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/privacy.json"))
    args = parser.parse_args(argv)
    results = privacy_rows(
        secagg_agents=args.secagg_agents,
        secagg_rounds=args.secagg_rounds,
        dp_noise=args.dp_noise,
        dp_rounds=args.dp_rounds,
        distributed_noise=args.distributed_noise,
    )
    print()
    print(privacy_tables(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
