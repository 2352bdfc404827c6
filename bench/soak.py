"""A soak run (not a test): frames and rounds for a long time while the broker restarts and
agents are killed, then a check that nothing was delivered twice and memory stayed flat.

    python bench/soak.py [--minutes 60] [--agents 3] [--fps 2] [--broker-restart 300]
                         [--agent-kill 420] [--sample 30] [--out bench/results/soak.json]

A fresh Mosquitto, a coordinator in this process and N ``fedge agent run`` processes (the
reference workload's shares), each serving the fleet's current release. A camera publishes
enveloped digit frames (QoS 1) on N camera topics, which every agent serves (agents take
frames at QoS 0, latest-frame-wins, so frames that reach an agent while it is down or the
broker is restarting get no result from it); a subscriber with a persistent session
collects every result (QoS 1), deduplicated by (agent, frame id). Rounds run back to back
(min_agents N-1, so a killed agent costs at most a deadline). Every ``--broker-restart``
seconds the broker is stopped and started again (alternately gracefully and with SIGKILL
after a database write); every ``--agent-kill`` seconds one agent (in turn) is SIGKILLed
and restarted.

At the end it checks: every round closed (ok or with a reason; none hung); each round stored
one update per agent at most and counted exactly what it stored; every result that arrived
more than once arrived as identical copies (deduplicated by frame id); results kept
arriving after every disruption. It prints the agents' and the coordinator's memory as a
series (RSS, PSS and USS from ``/proc/<pid>/smaps_rollup``, one sample every ``--sample``
seconds, with the rounds that closed in between, their median time and its phases) and
their growth: the peak USS of the last quarter of samples over that of the second quarter,
at most 10 MB per process to PASS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt

from coordinator.reference import digit_images_uint8, digit_png, load_digits_split
from coordinator.rounds import RoundPlan
from fedge.harness.clients import disconnect, mqtt_client, subscribe
from fedge.harness.federation import federation
from fedge.harness.memory import MB, memory_of
from fedge.harness.phases import PHASES, round_phases
from protocol.errors import FedgeError
from protocol.frames import FrameMeta, encode_envelope
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

DEFAULT_OUT = Path("bench/results/soak.json")
ROUND_DEADLINE_S = 30.0
FLAT_MB = 10.0


def _memory_mb(pid: int | None) -> dict[str, float]:
    """RSS, PSS and USS in MB (fedge.harness.memory says what each counts)."""
    memory = memory_of(pid) if pid else {"rss": 0, "pss": 0, "uss": 0}
    return {key: round(memory[key] / MB, 1) for key in ("rss", "pss", "uss")}


def _window(coordinator: Any, outcomes: list[Any]) -> dict[str, Any]:
    """The rounds that closed since the last sample: their median time and phases."""
    seconds, phases = [], []
    for outcome in outcomes:
        record = coordinator.state.round(outcome.round)
        if record is None or record.finished_at is None:
            continue
        seconds.append(record.finished_at - record.started_at)
        if outcome.ok:
            phases.append(round_phases(record.started_at, outcome.metrics))
    measured = [p for p in phases if p is not None]
    window: dict[str, Any] = {"rounds": len(outcomes), "failed": sum(not o.ok for o in outcomes)}
    if seconds:
        window["median_round_s"] = round(statistics.median(seconds), 3)
        window["max_round_s"] = round(max(seconds), 3)
    if measured:
        window["phases_ms"] = {
            name: round(1000 * statistics.median(p[name] for p in measured), 1) for name in PHASES
        }
    return window


def _growth(memory: list[dict[str, Any]]) -> dict[str, float]:
    """USS growth per process: the peak of the last quarter of samples over the second's.

    The first quarter is warm-up (models loaded, caches filled); a restarted agent starts
    low again, so peaks, not single samples, are compared. USS, because a process's PSS
    moves when other processes sharing its libraries start or exit.
    """
    quarter = max(1, len(memory) // 4)
    early, late = memory[quarter : 2 * quarter] or memory, memory[-quarter:]

    def peak(samples: list[dict[str, Any]], pick: Any) -> float:
        return float(max(pick(sample)["uss"] for sample in samples))

    growth = {"coordinator": peak(late, lambda m: m["coordinator_mb"])}
    growth["coordinator"] -= peak(early, lambda m: m["coordinator_mb"])
    for index in range(len(memory[0]["agents_mb"])):
        late_peak = peak(late, lambda m, i=index: m["agents_mb"][i])
        growth[f"agent-{index:02d}"] = late_peak - peak(early, lambda m, i=index: m["agents_mb"][i])
    return {key: round(value, 1) for key, value in growth.items()}


def _series(memory: list[dict[str, Any]]) -> str:
    """The memory series (PSS, MB) with each window's rounds and median round time."""
    lines = ["     t s  coord USS  agents' USS              rounds  median round s"]
    for sample in memory:
        agents = " ".join(f"{a['uss']:5.0f}" for a in sample["agents_mb"])
        window = sample["window"]
        lines.append(
            f"{sample['t_s']:8.0f}  {sample['coordinator_mb']['uss']:9.0f}  {agents:<24} "
            f"{window['rounds']:6d}  {window.get('median_round_s', float('nan')):14.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second per agent")
    parser.add_argument("--broker-restart", type=float, default=300.0, help="seconds")
    parser.add_argument("--agent-kill", type=float, default=420.0, help="seconds")
    parser.add_argument("--sample", type=float, default=30.0, help="memory sample, seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, help="keep broker, agents and logs here")
    args = parser.parse_args(argv)
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install -y mosquitto)")
    split = load_digits_split()
    images = [digit_png(image) for image in digit_images_uint8(split.x_test[:64])]
    topics = Topics(root=f"soak-{uuid.uuid4().hex[:8]}", fleet="soak")
    results: dict[tuple[str, str], set[bytes]] = defaultdict(set)
    # Digests, not payloads, and counts, not times: the bookkeeping of an hour's results
    # shares the coordinator's process, whose memory the soak watches.
    arrivals = {"count": 0, "last": 0.0}
    lock = threading.Lock()

    def on_result(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        agent = topics.parse(message.topic).agent or "?"
        frame_id = json.loads(message.payload).get("frame_id", "?")
        with lock:
            results[(agent, frame_id)].add(hashlib.blake2b(message.payload, digest_size=8).digest())
            arrivals["count"] += 1
            arrivals["last"] = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="fedge-soak-") as tmp:
        root = args.workdir or Path(tmp)
        broker = MosquittoProcess(binary, root / "mosquitto")
        broker.start()
        stop = threading.Event()
        outcomes: list[Any] = []
        round_errors: list[str] = []
        memory: list[dict[str, Any]] = []
        disruptions: list[tuple[float, str]] = []
        published = 0
        try:
            with federation(root / "fleet", broker, topics, num_agents=args.agents) as fed:
                coordinator = fed.start_coordinator()
                fed.wait_for_agents(args.agents)
                sink = mqtt_client(
                    broker, client_id=f"soak-sink-{topics.root}", clean_session=False
                )
                sink.on_message = on_result
                subscribe(sink, topics.all_agent_results())
                camera = mqtt_client(broker, client_id=f"soak-cam-{topics.root}")

                def rounds() -> None:
                    plan = RoundPlan(
                        min_agents=max(1, args.agents - 1), deadline_s=ROUND_DEADLINE_S
                    )
                    while not stop.is_set():
                        try:
                            outcomes.extend(coordinator.run_plan_now(plan))
                        except FedgeError as exc:  # e.g. too few agents online: try again
                            round_errors.append(str(exc))

                worker = threading.Thread(target=rounds, name="soak-rounds", daemon=True)
                worker.start()
                started = time.monotonic()
                end = started + args.minutes * 60
                next_restart = started + args.broker_restart
                next_kill = started + args.agent_kill
                next_sample = started
                sampled = 0
                restarts = kills = 0
                period = 1.0 / args.fps
                while time.monotonic() < end:
                    now = time.monotonic()
                    for index, agent in enumerate(fed.agents):
                        frame = encode_envelope(
                            images[published % len(images)],
                            FrameMeta(frame_id=f"{agent.agent_id}-{published:08d}"),
                        )
                        camera.publish(topics.camera_frames(f"cam{index}"), frame, qos=1)
                        published += 1
                    if now >= next_sample:
                        closed = len(outcomes)
                        memory.append(
                            {
                                "t_s": round(now - started, 1),
                                "coordinator_mb": _memory_mb(os.getpid()),
                                "agents_mb": [
                                    _memory_mb(a.process.pid if a.process else None)
                                    for a in fed.agents
                                ],
                                "rounds_total": closed,
                                "window": _window(coordinator, outcomes[sampled:closed]),
                            }
                        )
                        for i in range(sampled, closed):  # only what the final checks need
                            o = outcomes[i]
                            updates = {"updates": o.metrics.get("updates", 0)}
                            outcomes[i] = SimpleNamespace(
                                round=o.round, ok=o.ok, reason=o.reason, metrics=updates
                            )
                        sampled = closed
                        print(f"t={now - started:7.0f} s  {json.dumps(memory[-1])}", flush=True)
                        next_sample += args.sample
                    if now >= next_restart:
                        if restarts % 2:
                            broker.persist()
                            broker.kill()
                            broker.start()
                        else:
                            broker.restart()
                        restarts += 1
                        disruptions.append((time.monotonic(), "broker restart"))
                        next_restart += args.broker_restart
                    if now >= next_kill:
                        victim = fed.agents[kills % len(fed.agents)]
                        victim.kill()
                        victim.start()
                        kills += 1
                        disruptions.append((time.monotonic(), f"killed {victim.agent_id}"))
                        next_kill += args.agent_kill
                    stop.wait(period)
                stop.set()
                coordinator.runner.request_stop("the soak is over")
                worker.join(ROUND_DEADLINE_S * 3)
                time.sleep(5)  # let the last results drain before the check (a soak, not a test)
                rounds_done = [coordinator.state.round(o.round) for o in outcomes]
                update_check = all(
                    o.metrics.get("updates", 0) == len(coordinator.state.updates(o.round))
                    for o in outcomes
                    if o.ok
                )
                disconnect(sink)
                disconnect(camera)
        finally:
            broker.stop()
    conflicting = [key for key, copies in results.items() if len(copies) > 1]
    resumed = all(arrivals["last"] > at for at, _ in disruptions)
    report = {
        "minutes": args.minutes,
        "agents": args.agents,
        "frames_published": published,
        "results_possible": published * args.agents,
        "results_unique": len(results),
        "results_conflicting": len(conflicting),
        "rounds": len(outcomes),
        "rounds_ok": sum(o.ok for o in outcomes),
        "rounds_failed": [(o.round, o.reason) for o in outcomes if not o.ok],
        "rounds_unclosed": sum(r is None or r.finished_at is None for r in rounds_done),
        "updates_counted_as_stored": update_check,
        "results_after_every_disruption": resumed,
        "results_arrivals": arrivals["count"],
        "round_errors": round_errors[:20],
        "disruptions": [d for _, d in disruptions],
        "memory_growth_mb": _growth(memory),
        "memory": memory,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "memory"}, indent=2))
    print(_series(memory))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    flat = all(v <= FLAT_MB for v in report["memory_growth_mb"].values())
    print(f"memory flat (USS growth at most {FLAT_MB:g} MB per process): {flat}")
    ok = not conflicting and update_check and resumed and report["rounds_unclosed"] == 0
    ok = ok and flat
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
