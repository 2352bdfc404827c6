"""Privacy on REFERENCE.md's workload: secure aggregation and DP-FedAvg next to plain FedAvg.

    python bench/privacy.py [--secagg-agents 10 50] [--secagg-rounds 5]
                            [--dp-noise 0.5 1 2] [--dp-rounds 30]
                            [--out bench/results/privacy.json]

Same harness as ``bench/federated.py`` (a fresh Mosquitto, N ``fedge agent run`` processes
training with LiteRT, the coordinator in this process), same data and model. Rows:

- secure aggregation at each N of ``--secagg-agents`` (threshold 3, degree 6, clip range
  0.5, 2^20 levels) against plain FedAvg float32 in the same run of this script: bytes of
  update per agent per round (the masked upload; the key, share and unmask messages are a
  few kB on top, see README) and the median round time;
- DP-FedAvg (N=10, clip norm 0.5, fixed clipping) at each ``--dp-noise`` multiplier: the
  accuracy per round and epsilon at the last round (delta 1e-5, no amplification).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federated import ROUND_DEADLINE_S, run_once

from coordinator.accountant import epsilon_spent
from coordinator.dp import DpOptions
from coordinator.rounds import RoundPlan
from protocol.messages.secagg import SecAggParams

SECAGG = SecAggParams(
    threshold=3, degree=6, clip_range=0.5, quantisation_levels=2**20, stage_deadline_s=30.0
)
DP_CLIP_NORM = 0.5
DP_DELTA = 1e-5


@dataclass(frozen=True, slots=True)
class PrivacySpec:
    agents: int
    secure: bool = False
    noise: float | None = None

    @property
    def name(self) -> str:
        if self.secure:
            return f"N={self.agents} fedavg secagg"
        if self.noise is not None:
            return f"N={self.agents} DP z={self.noise:g}"
        return f"N={self.agents} fedavg float32"

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


def _run(spec: PrivacySpec, rounds: int, root: Path) -> dict[str, Any]:
    print(f"running {spec.name}, {rounds} rounds ...", flush=True)
    workdir = root / f"{len(list(root.iterdir())):02d}-{spec.name.replace(' ', '_')}"
    run = run_once(spec, rounds, workdir)  # type: ignore[arg-type]
    rows = run["rounds"]
    seconds = [r["seconds"] for r in rows if r["ok"] and r["seconds"] is not None]
    up = [r["bytes_up_per_agent"] for r in rows if r["bytes_up_per_agent"]]
    return {
        "name": spec.name,
        "rounds": rows,
        "median_round_s": statistics.median(seconds) if seconds else None,
        "bytes_up_per_agent": statistics.median(up) if up else None,
        "accuracy": [r["accuracy"] for r in rows],
        "epsilon": None,
        "failed": [r["reason"] for r in rows if not r["ok"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secagg-agents", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--secagg-rounds", type=int, default=5)
    parser.add_argument("--dp-noise", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    parser.add_argument("--dp-rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results/privacy.json"))
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"secagg": [], "dp": []}
    with tempfile.TemporaryDirectory(prefix="fedge-privacy-") as tmp:
        root = Path(tmp)
        for agents in args.secagg_agents:
            plain = _run(PrivacySpec(agents), args.secagg_rounds, root)
            secure = _run(PrivacySpec(agents, secure=True), args.secagg_rounds, root)
            results["secagg"].append({"agents": agents, "plain": plain, "secure": secure})
        if args.dp_noise:
            results["dp"].append(_run(PrivacySpec(10), args.dp_rounds, root))
        for noise in args.dp_noise:
            run = _run(PrivacySpec(10, noise=noise), args.dp_rounds, root)
            done = sum(1 for r in run["rounds"] if r["ok"])
            # What the coordinator reports (tests hold them equal to 1e-9).
            run["epsilon"] = epsilon_spent([noise] * done, DP_DELTA)
            results["dp"].append(run)
    print("\nsecure aggregation vs plain FedAvg (same run)")
    print("| N | up per agent plain / secagg | ratio | median round plain / secagg | ratio |")
    for row in results["secagg"]:
        p, s = row["plain"], row["secure"]
        up = (s["bytes_up_per_agent"] or 0) / (p["bytes_up_per_agent"] or 1)
        rt = (s["median_round_s"] or 0) / (p["median_round_s"] or 1)
        print(
            f"| {row['agents']} | {p['bytes_up_per_agent'] or 0:.0f} / "
            f"{s['bytes_up_per_agent'] or 0:.0f} B | {up:.2f}x | {p['median_round_s'] or 0:.2f} / "
            f"{s['median_round_s'] or 0:.2f} s | {rt:.1f}x |"
        )
    print("\nDP-FedAvg, N=10, clip 0.5, accuracy r5 / r10 / r20 / r30, epsilon at the end")
    for run in results["dp"]:
        acc = run["accuracy"]
        picks = [acc[i - 1] for i in (5, 10, 20, 30) if i <= len(acc) and acc[i - 1] is not None]
        eps = "-" if run["epsilon"] is None else f"{run['epsilon']:.1f}"
        print(f"| {run['name']} | {' / '.join(f'{a:.3f}' for a in picks)} | {eps} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
