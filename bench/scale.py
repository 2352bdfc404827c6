"""Many agent processes through one Mosquitto: round time and memory as the fleet grows.

    python bench/scale.py [--agents 20 50] [--rounds 10] [--out bench/results/scale.json]

For each N: a fresh Mosquitto, N ``fedge agent run`` processes (LiteRT trainer, TensorFlow
blocked, the reference non-IID split over N) and the coordinator in this process; FedAvg,
all agents every round. Prints per N the median round (start to close, as the coordinator
recorded it), the coordinator's resident memory before the rounds, after them and at its
peak, the agents' total and per-agent resident memory, and the broker's established TCP
connections (one per agent plus the coordinator's). Writes JSON.

The machine's memory bounds N: each agent process is about 100 MB resident, so check
``agents x 110 MB`` against free memory before a large N.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from coordinator.rounds import RoundPlan
from fedge.harness.federation import federation
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

DEFAULT_OUT = Path("bench/results/scale.json")
ROUND_DEADLINE_S = 120.0
ONLINE_TIMEOUT_S = 900.0
MB = 2**20


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MB


def _established(pid: int) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED for c in psutil.Process(pid).net_connections())


def run(agents: int, rounds: int, workdir: Path) -> dict[str, Any]:
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install -y mosquitto)")
    broker = MosquittoProcess(binary, workdir / "mosquitto")
    broker.start()
    topics = Topics(root=f"scale-{uuid.uuid4().hex[:8]}", fleet="scale")
    me = psutil.Process().pid
    try:
        started = time.perf_counter()
        with federation(workdir / "fleet", broker, topics, num_agents=agents) as fed:
            coordinator = fed.start_coordinator()
            fed.wait_for_agents(agents, timeout_s=ONLINE_TIMEOUT_S)
            online_s = time.perf_counter() - started
            before_mb = _rss_mb(me)
            seconds, accuracy = [], []
            for _ in range(rounds):
                (outcome,) = coordinator.run_plan_now(
                    RoundPlan(min_agents=agents, deadline_s=ROUND_DEADLINE_S)
                )
                record = coordinator.state.round(outcome.round)
                assert record is not None
                closed = record.finished_at or record.deadline_at
                seconds.append(closed - record.started_at)
                accuracy.append(outcome.metrics.get("accuracy"))
                print(
                    f"  N={agents} round {outcome.round}: {seconds[-1]:.2f} s, "
                    f"{outcome.metrics.get('updates')} updates, ok={outcome.ok}",
                    flush=True,
                )
            agent_mb = [_rss_mb(a.process.pid) for a in fed.agents if a.process is not None]
            connections = _established(broker.pid) if broker.pid else 0
            after_mb = _rss_mb(me)
    finally:
        broker.stop()
    return {
        "agents": agents,
        "rounds": rounds,
        "online_s": online_s,
        "round_s": seconds,
        "median_round_s": statistics.median(seconds),
        "accuracy": accuracy,
        "coordinator_rss_before_mb": before_mb,
        "coordinator_rss_after_mb": after_mb,
        "coordinator_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "agents_total_rss_mb": sum(agent_mb),
        "agent_rss_mb": statistics.median(agent_mb),
        "broker_connections": connections,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results = []
    for agents in args.agents:
        print(f"N={agents}: starting {agents} agent processes ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"fedge-scale-{agents}-") as tmp:
            results.append(run(agents, args.rounds, Path(tmp)))
    print(
        f"{'N':>4} {'online s':>9} {'median round s':>15} {'coord MB before/after/peak':>27} "
        f"{'agents MB total':>16} {'MB each':>8} {'broker conns':>13}"
    )
    for r in results:
        coord = (
            f"{r['coordinator_rss_before_mb']:.0f}/{r['coordinator_rss_after_mb']:.0f}/"
            f"{r['coordinator_peak_rss_mb']:.0f}"
        )
        print(
            f"{r['agents']:>4} {r['online_s']:>9.1f} {r['median_round_s']:>15.2f} {coord:>27} "
            f"{r['agents_total_rss_mb']:>16.0f} {r['agent_rss_mb']:>8.0f} "
            f"{r['broker_connections']:>13}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
