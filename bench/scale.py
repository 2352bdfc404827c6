"""Many agent processes through one Mosquitto: round time and memory as the fleet grows.

    python bench/scale.py [--agents 20 50 200] [--rounds 10] [--min-available-gib 3]
                          [--out bench/results/scale.json]

For each N: a fresh Mosquitto, N ``fedge agent run`` processes (LiteRT trainer, TensorFlow
blocked, the reference non-IID split over N) and the coordinator in this process; FedAvg,
all agents every round. Prints every round's time with the agents' total PSS and the
machine's available memory, then per N: the median round (start to close, as the
coordinator recorded it) and its phases (``fedge.harness.phases``), the coordinator's
resident memory before the rounds, after them and at its peak, the agents' total memory as
PSS, USS and RSS (``fedge.harness.memory``: RSS counts the libraries the agents share once
per agent, so summed it overstates; PSS shares them out, USS leaves them out) and per agent,
and the broker's established TCP connections (one per agent plus the coordinator's).
Writes JSON.

The machine's memory bounds N (an agent takes about 50 MB PSS): a run does not start when
``MemAvailable`` is below ``N x 70 MB`` plus the floor, and while it runs a watcher stops
the agents and the rounds as soon as ``MemAvailable`` drops under the floor (3 GiB by
default), so other work on the machine keeps its memory; the result then says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from coordinator.rounds import RoundPlan
from fedge.harness.federation import Federation, federation
from fedge.harness.memory import MB, available_bytes, memory_of, total_memory
from fedge.harness.phases import phase_table, round_phases
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

DEFAULT_OUT = Path("bench/results/scale.json")
ROUND_DEADLINE_S = 120.0
ONLINE_TIMEOUT_S = 1800.0
GIB = 2**30
# Other work shares the machine: below this much available memory the run stops itself.
DEFAULT_MIN_AVAILABLE_GIB = 3.0
# What one more agent process is expected to take (USS about 50 MB, measured), for the check
# before a run.
AGENT_BUDGET_MB = 70


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MB


class MemoryGuard:
    """Watches ``MemAvailable``; below the floor it stops the agents, so the run ends cleanly.

    Also keeps the lowest value seen and the agents' peak total PSS.
    """

    def __init__(self, floor_bytes: int, fed: Federation, coordinator: Any) -> None:
        self.floor = floor_bytes
        self.lowest = available_bytes()
        self.tripped: str | None = None
        self._fed = fed
        self._coordinator = coordinator
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-guard", daemon=True)

    def __enter__(self) -> MemoryGuard:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            available = available_bytes()
            self.lowest = min(self.lowest, available)
            if available < self.floor and self.tripped is None:
                self.tripped = (
                    f"MemAvailable {available / GIB:.2f} GiB under {self.floor / GIB:.1f} GiB: "
                    "agents stopped"
                )
                print(f"ABORT: {self.tripped}", flush=True)
                if self._coordinator is not None:
                    self._coordinator.runner.request_stop(self.tripped)
                for agent in self._fed.agents:
                    agent.kill()


def _established(pid: int) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED for c in psutil.Process(pid).net_connections())


def run(agents: int, rounds: int, workdir: Path, floor_bytes: int) -> dict[str, Any]:
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
            with MemoryGuard(floor_bytes, fed, coordinator) as guard:
                try:
                    fed.wait_for_agents(agents, timeout_s=ONLINE_TIMEOUT_S)
                except AssertionError:
                    if guard.tripped is None:
                        raise
                    return {"agents": agents, "aborted": guard.tripped, "rounds_done": 0}
                online_s = time.perf_counter() - started
                before_mb = _rss_mb(me)
                seconds, accuracy, phases = [], [], []
                agents_peak: dict[str, int] = {"pss": 0, "uss": 0, "rss": 0}
                for _ in range(rounds):
                    if guard.tripped:
                        break
                    (outcome,) = coordinator.run_plan_now(
                        RoundPlan(min_agents=agents, deadline_s=ROUND_DEADLINE_S)
                    )
                    record = coordinator.state.round(outcome.round)
                    assert record is not None
                    closed = record.finished_at or record.deadline_at
                    seconds.append(closed - record.started_at)
                    accuracy.append(outcome.metrics.get("accuracy"))
                    phases.append(round_phases(record.started_at, outcome.metrics))
                    pids = [a.process.pid for a in fed.agents if a.process is not None]
                    now = total_memory(pids)
                    agents_peak = {k: max(v, now[k]) for k, v in agents_peak.items()}
                    print(
                        f"  N={agents} round {outcome.round}: {seconds[-1]:.2f} s, "
                        f"{outcome.metrics.get('updates')} updates, ok={outcome.ok}; "
                        f"agents PSS {now['pss'] / MB:.0f} MB, "
                        f"available {available_bytes() / GIB:.1f} GiB",
                        flush=True,
                    )
                pids = [a.process.pid for a in fed.agents if a.process is not None]
                agent_memory = [memory_of(pid) for pid in pids]
                connections = _established(broker.pid) if broker.pid else 0
                broker_memory = memory_of(broker.pid) if broker.pid else {"rss": 0}
                after_mb = _rss_mb(me)
    finally:
        broker.stop()
    print(phase_table(phases, f"N={agents}: a round's phases"), flush=True)
    return {
        "aborted": guard.tripped,
        "lowest_available_gib": guard.lowest / GIB,
        "rounds_done": len(seconds),
        "phases": phases,
        "agents_total_pss_mb": sum(m["pss"] for m in agent_memory) / MB,
        "agents_total_uss_mb": sum(m["uss"] for m in agent_memory) / MB,
        "agents_peak_total_pss_mb": agents_peak["pss"] / MB,
        "agent_pss_mb": statistics.median(m["pss"] for m in agent_memory) / MB,
        "agent_uss_mb": statistics.median(m["uss"] for m in agent_memory) / MB,
        "broker_rss_mb": broker_memory["rss"] / MB,
        "agents": agents,
        "rounds": rounds,
        "online_s": online_s,
        "round_s": seconds,
        "median_round_s": statistics.median(seconds) if seconds else None,
        "accuracy": accuracy,
        "coordinator_rss_before_mb": before_mb,
        "coordinator_rss_after_mb": after_mb,
        "coordinator_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "agents_total_rss_mb": sum(m["rss"] for m in agent_memory) / MB,
        "agent_rss_mb": statistics.median(m["rss"] for m in agent_memory) / MB,
        "broker_connections": connections,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--min-available-gib",
        type=float,
        default=DEFAULT_MIN_AVAILABLE_GIB,
        help="stop the run when MemAvailable drops below this (GiB)",
    )
    args = parser.parse_args(argv)
    floor = int(args.min_available_gib * GIB)
    results = []
    for agents in args.agents:
        needed = floor + agents * AGENT_BUDGET_MB * MB
        if available_bytes() < needed:
            print(
                f"N={agents}: not started: {available_bytes() / GIB:.1f} GiB available, "
                f"{needed / GIB:.1f} GiB needed ({agents} x {AGENT_BUDGET_MB} MB + the floor)"
            )
            continue
        print(f"N={agents}: starting {agents} agent processes ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"fedge-scale-{agents}-") as tmp:
            results.append(run(agents, args.rounds, Path(tmp), floor))
    print(
        f"{'N':>4} {'rounds':>6} {'online s':>9} {'median round s':>15} "
        f"{'coord MB before/after/peak':>27} {'agents MB PSS/USS/RSS':>22} "
        f"{'MB each PSS/USS':>16} {'broker conns':>13}"
    )
    for r in results:
        if not r.get("rounds_done"):
            print(f"{r['agents']:>4} aborted: {r.get('aborted')}")
            continue
        coord = (
            f"{r['coordinator_rss_before_mb']:.0f}/{r['coordinator_rss_after_mb']:.0f}/"
            f"{r['coordinator_peak_rss_mb']:.0f}"
        )
        total = (
            f"{r['agents_total_pss_mb']:.0f}/{r['agents_total_uss_mb']:.0f}/"
            f"{r['agents_total_rss_mb']:.0f}"
        )
        each = f"{r['agent_pss_mb']:.0f}/{r['agent_uss_mb']:.0f}"
        print(
            f"{r['agents']:>4} {r['rounds_done']:>6} {r['online_s']:>9.1f} "
            f"{r['median_round_s']:>15.2f} {coord:>27} {total:>22} {each:>16} "
            f"{r['broker_connections']:>13}"
        )
        if r.get("aborted"):
            print(f"     aborted: {r['aborted']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
