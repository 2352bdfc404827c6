"""The outside fuzzer, long: hostile payloads at real agent and coordinator processes.

    python bench/fuzz.py [--payloads 20000] [--check-every 1000] [--seed 1]
                         [--out bench/results/fuzz.json]

A fresh Mosquitto, one ``fedge agent run`` process (LiteRT, no TensorFlow) and one
``fedge coordinator run`` process. ``fedge.harness.fuzz`` publishes random and mutated-valid
payloads on every topic either reads (QoS 0 and 1 mixed, commands at QoS 1); every
``--check-every`` payloads both must answer a ping. At the end: commands left without an
answer (must be 0), pings answered and their times, and tracebacks in either log (must be
0). Prints a table and writes JSON; exits 1 if a property failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fedge.harness.clients import MessageCollector, disconnect, mqtt_client, publish, subscribe
from fedge.harness.federation import federation
from fedge.harness.fuzz import Fuzzer, decoded_message, fleet_targets
from protocol.messages.agent import CommandAck
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

DEFAULT_OUT = Path("bench/results/fuzz.json")
AGENT = "agent-00"
PING_TIMEOUT_S = 60.0
START_TIMEOUT_S = 180.0


def _ping_ms(collector: MessageCollector, client: Any, commands: str, events: str) -> float:
    command_id = f"live-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    publish(client, commands, json.dumps({"kind": "ping", "command_id": command_id}).encode())

    def answered(messages: list[Any]) -> bool:
        return any(
            m.topic == events
            and isinstance(decoded_message(m.payload), CommandAck)
            and decoded_message(m.payload).command_id == command_id  # type: ignore[union-attr]
            for m in messages
        )

    collector.wait_for(answered, PING_TIMEOUT_S)
    return (time.perf_counter() - started) * 1000.0


def run(payloads: int, check_every: int, seed: int, workdir: Path) -> dict[str, Any]:
    binary = find_mosquitto()
    if binary is None:
        sys.exit("mosquitto is not installed (apt-get install -y mosquitto)")
    broker = MosquittoProcess(binary, workdir / "mosquitto")
    broker.start()
    topics = Topics(root=f"bench-fuzz-{uuid.uuid4().hex[:8]}", fleet="bench")
    pings: dict[str, list[float]] = {"agent": [], "coordinator": []}
    try:
        with federation(workdir / "fleet", broker, topics, num_agents=1) as fed:
            coordinator = fed.start_coordinator_process()
            collector = MessageCollector()
            client = mqtt_client(broker, collector=collector)
            routes = {
                "agent": (topics.agent_commands(AGENT), topics.agent_events(AGENT)),
                "coordinator": (topics.coordinator_commands(), topics.coordinator_events()),
            }
            try:
                for _commands, events in routes.values():
                    subscribe(client, events)
                deadline = time.monotonic() + START_TIMEOUT_S
                for name, (commands, events) in routes.items():  # both up before fuzzing
                    while True:
                        try:
                            pings[name].append(_ping_ms(collector, client, commands, events))
                            break
                        except AssertionError:
                            if time.monotonic() > deadline:
                                raise
                targets = fleet_targets(topics, agent=AGENT, camera="cam", rounds=(1, 2))
                fuzzer = Fuzzer(client, targets, seed=seed)

                def alive(_count: int) -> None:
                    for name, (commands, events) in routes.items():
                        pings[name].append(_ping_ms(collector, client, commands, events))

                started = time.perf_counter()
                fuzzer.run(payloads, every=check_every, check=alive)
                alive(payloads)
                seconds = time.perf_counter() - started
                missing = fuzzer.answers.missing(
                    collector.messages,
                    lambda topic: dict(routes.values())[topic],
                )
                commands_sent = sum(map(len, fuzzer.answers.sent.values())) + sum(
                    fuzzer.answers.unnamed.values()
                )
            finally:
                disconnect(client)
            logs = {"agent": fed.agents[0].log(), "coordinator": coordinator.log()}
    finally:
        broker.stop()
    return {
        "payloads": payloads,
        "seconds": seconds,
        "commands": commands_sent,
        "unanswered": missing,
        "tracebacks": {name: text.count("Traceback") for name, text in logs.items()},
        "pings": {
            name: {
                "count": len(values),
                "median_ms": statistics.median(values),
                "max_ms": max(values),
            }
            for name, values in pings.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=20_000)
    parser.add_argument("--check-every", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-fuzz-") as workdir:
        result = run(args.payloads, args.check_every, args.seed, Path(workdir))
    print(f"{'payloads':<24}{result['payloads']:>12}")
    print(f"{'payloads per second':<24}{result['payloads'] / result['seconds']:>12.0f}")
    print(f"{'commands sent':<24}{result['commands']:>12}")
    print(f"{'commands unanswered':<24}{result['unanswered']:>12}")
    for name, ping in result["pings"].items():
        print(f"{name + ' pings':<24}{ping['count']:>12}  median {ping['median_ms']:.1f} ms")
        print(f"{name + ' tracebacks':<24}{result['tracebacks'][name]:>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if result["unanswered"] or any(result["tracebacks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
