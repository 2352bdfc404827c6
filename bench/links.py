"""Federated rounds over slow and lossy links, next to the same rounds on a clean link.

    python bench/links.py [--agents 3] [--rounds 3] [--profiles clean wifi lte bad-lte]
                          [--deadline 240] [--out bench/results/links.json]

For each link profile (``fedge.harness.links``: latency, jitter, bandwidth, periodic stalls and
loss bursts, simulated in user space by ``fedge.harness.faults``'s proxy) a fresh Mosquitto and a
fresh federation: N ``fedge agent run`` processes (LiteRT trainer, no TensorFlow), each
connected to the broker through its own shaped link; the coordinator in this process on a
clean connection. Prints, per profile, the median round time, rounds closed before their
deadline, bytes down and up per agent per round (as the link carried them, MQTT included),
and the ratio of round time to the clean link's; writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from coordinator.rounds import RoundPlan
from fedge.harness.faults import TcpProxy
from fedge.harness.federation import federation
from fedge.harness.links import PROFILES, LinkProfile
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

DEFAULT_OUT = Path("bench/results/links.json")


def run_profile(
    profile: LinkProfile, *, agents: int, rounds: int, deadline_s: float, workdir: Path
) -> dict[str, Any]:
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install -y mosquitto)")
    broker = MosquittoProcess(binary, workdir / "mosquitto")
    broker.start()
    topics = Topics(root=f"bench-links-{uuid.uuid4().hex[:8]}", fleet="bench")
    try:
        with ExitStack() as stack:
            links = [
                stack.enter_context(TcpProxy(broker.host, broker.port, profile=profile))
                for _ in range(agents)
            ]
            per_agent = {f"agent-{i:02d}": {"broker_url": link.url} for i, link in enumerate(links)}
            fed = stack.enter_context(
                federation(workdir, broker, topics, num_agents=agents, per_agent=per_agent)
            )
            coordinator = fed.start_coordinator()
            fed.wait_for_agents(agents, timeout_s=max(120.0, deadline_s))
            # Start-up traffic (status, the first release) is not a round's.
            down0 = sum(link.bytes_down for link in links)
            up0 = sum(link.bytes_up for link in links)
            per_round = []
            for _ in range(rounds):
                down_before = sum(link.bytes_down for link in links)
                up_before = sum(link.bytes_up for link in links)
                (outcome,) = coordinator.run_plan_now(
                    RoundPlan(min_agents=agents, deadline_s=deadline_s)
                )
                record = coordinator.state.round(outcome.round)
                assert record is not None
                finished = record.finished_at or record.deadline_at
                per_round.append(
                    {
                        "round": outcome.round,
                        "ok": outcome.ok,
                        "updates": outcome.metrics.get("updates", 0),
                        "seconds": finished - record.started_at,
                        "before_deadline": record.finished_at is not None
                        and record.finished_at < record.deadline_at,
                        "down_per_agent": (sum(lk.bytes_down for lk in links) - down_before)
                        / agents,
                        "up_per_agent": (sum(lk.bytes_up for lk in links) - up_before) / agents,
                    }
                )
                done = per_round[-1]
                print(
                    f"  {profile.name} round {done['round']}: {done['seconds']:.2f} s, "
                    f"{done['updates']} updates, ok={done['ok']}",
                    flush=True,
                )
            total_down = sum(link.bytes_down for link in links) - down0
            total_up = sum(link.bytes_up for link in links) - up0
    finally:
        broker.stop()
    seconds = [r["seconds"] for r in per_round]
    return {
        "profile": profile.name,
        "link": profile.describe(),
        "agents": agents,
        "rounds": per_round,
        "median_round_s": statistics.median(seconds),
        "max_round_s": max(seconds),
        "before_deadline": sum(r["before_deadline"] for r in per_round),
        "down_per_agent_round": total_down / agents / rounds,
        "up_per_agent_round": total_up / agents / rounds,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    clean = next((r for r in results if r["profile"] == "clean"), None)
    print(
        f"{'profile':<10} {'link':<68} {'median s':>9} {'max s':>7} {'in time':>8} "
        f"{'kB down':>8} {'kB up':>7} {'x clean':>8}"
    )
    for r in results:
        ratio = r["median_round_s"] / clean["median_round_s"] if clean else float("nan")
        print(
            f"{r['profile']:<10} {r['link']:<68} {r['median_round_s']:>9.2f} "
            f"{r['max_round_s']:>7.2f} {r['before_deadline']:>4}/{len(r['rounds']):<3} "
            f"{r['down_per_agent_round'] / 1000:>8.1f} {r['up_per_agent_round'] / 1000:>7.1f} "
            f"{ratio:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--deadline", type=float, default=240.0, help="round deadline, seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    results = []
    for name in args.profiles:
        print(f"running {name}: {PROFILES[name].describe()} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"fedge-links-{name}-") as tmp:
            results.append(
                run_profile(
                    PROFILES[name],
                    agents=args.agents,
                    rounds=args.rounds,
                    deadline_s=args.deadline,
                    workdir=Path(tmp),
                )
            )
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
