"""Secure aggregation through a real Mosquitto, agents as processes, agents dropping.

An agent "drops at a stage" when its link to the broker starts swallowing everything it
sends (a proxy's ``hold_upstream``) just before the coordinator opens that stage: the
coordinator reports each stage before it publishes it, so the drop is exact, not a race.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.rounds import RoundPlan
from fedge.harness.faults import TcpProxy
from fedge.harness.federation import federation
from protocol.messages.rounds import UpdateEncoding
from protocol.messages.secagg import SecAggParams
from protocol.secagg import error_bound, quantise
from protocol.topics import Topics
from protocol.updates import decode_update, decode_weights
from tests.brokers import MessageCollector, MosquittoProcess, disconnect, mqtt_client, subscribe

pytestmark = [pytest.mark.broker, pytest.mark.system]

AGENTS = 6
PARAMS = SecAggParams(
    threshold=3, degree=5, clip_range=0.5, quantisation_levels=2**20, stage_deadline_s=4.0
)


def run_secure_round(
    tmp_path: Path, mosquitto: MosquittoProcess, topics: Topics, stage: str, victims: list[str]
) -> dict[str, Any]:
    with ExitStack() as stack:
        proxies = {
            v: stack.enter_context(TcpProxy(mosquitto.host, mosquitto.port)) for v in victims
        }
        collector = MessageCollector()
        watcher = mqtt_client(mosquitto, collector=collector)
        stack.callback(disconnect, watcher)
        subscribe(watcher, f"{topics.root}/{topics.fleet}/#")
        fed = stack.enter_context(
            federation(
                tmp_path,
                mosquitto,
                topics,
                num_agents=AGENTS,
                trainer="litert",
                per_agent={v: {"broker_url": p.url} for v, p in proxies.items()},
            )
        )
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(AGENTS)
        original = coordinator.runner._on_progress
        held: list[str] = []

        def on_progress(progress: dict[str, Any]) -> None:
            if progress.get("stage") == stage and not held:
                for proxy in proxies.values():
                    proxy.hold_upstream()
                held.append(stage)
            if original is not None:
                original(progress)

        coordinator.runner._on_progress = on_progress
        if stage == "keys":
            for proxy in proxies.values():
                proxy.hold_upstream()
        outcomes = coordinator.run_plan_now(
            RoundPlan(rounds=1, min_agents=AGENTS, deadline_s=20.0, secure_aggregation=PARAMS)
        )
        result: dict[str, Any] = {"outcome": outcomes[0], "fed": fed}
        if outcomes[0].ok:
            release = coordinator.runner.current_release()
            base = decode_weights(coordinator.state.blob(fed_release_base(coordinator)))
            new = coordinator.runner.weights_of(release)
            result["mean"] = np.concatenate(
                [np.ravel(n.astype(np.float64) - b) for n, b in zip(new, base, strict=True)]
            )
        result["plain"] = {
            agent.agent_id: decode_update(
                (agent.data_dir / "federated" / "updates" / "1.plain").read_bytes()
            )
            for agent in fed.agents
            if (agent.data_dir / "federated" / "updates" / "1.plain").exists()
        }
        result["stored"] = coordinator.state.updates(1)
        result["db"] = dump_database(fed.root / "coordinator")
        result["messages"] = collector.messages
        result["logs"] = [agent.log() for agent in fed.agents]
    return result


def fed_release_base(coordinator: Any) -> str:
    text = coordinator.state.release_json("r0")
    from protocol.messages.rounds import ModelRelease

    return str(ModelRelease.model_validate_json(text).weights.sha256)


def dump_database(directory: Path) -> bytes:
    """Every byte of every row of every table of the coordinator's SQLite state."""
    dumped = b""
    for path in directory.glob("*.sqlite*"):
        if path.suffix != ".sqlite":
            continue
        connection = sqlite3.connect(path)
        try:
            for line in connection.iterdump():
                dumped += line.encode()
            for (blob,) in connection.execute("SELECT data FROM blobs"):
                dumped += bytes(blob)
            for (payload,) in connection.execute("SELECT payload FROM updates"):
                dumped += bytes(payload)
        finally:
            connection.close()
    return dumped


CASES = [
    ("keys", []),
    ("keys", ["agent-01"]),
    ("shares", ["agent-02"]),
    ("upload", ["agent-03"]),
    ("unmask", ["agent-04"]),
    ("keys", ["agent-00", "agent-03"]),
    ("shares", ["agent-01", "agent-04"]),
    ("upload", ["agent-02", "agent-05"]),
    ("unmask", ["agent-00", "agent-05"]),
]


@pytest.mark.parametrize(("stage", "victims"), CASES, ids=[f"{s}-{len(v)}" for s, v in CASES])
def test_the_unmasked_sum_is_the_plain_sum_and_no_update_shows(
    stage: str,
    victims: list[str],
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    result = run_secure_round(tmp_path, mosquitto, topics, stage, victims)
    outcome = result["outcome"]
    assert outcome.ok, outcome.reason
    uploaded = sorted(u.agent for u in result["stored"])
    expected = sorted(
        f"agent-{i:02d}"
        for i in range(AGENTS)
        if stage == "unmask" or f"agent-{i:02d}" not in victims
    )
    assert uploaded == expected
    assert all(u.encoding == UpdateEncoding.MASKED_U32.value for u in result["stored"])
    assert outcome.metrics["secagg_updates"] == len(expected)
    plain = {
        agent: np.concatenate([np.ravel(t) for t in tensors])
        for agent, tensors in result["plain"].items()
    }
    count = len(expected)
    plain_mean = sum(np.clip(plain[a], -0.5, 0.5).astype(np.float64) for a in expected) / count
    bound = error_bound(agents=count, clip=0.5, levels=PARAMS.quantisation_levels) / count
    # float32 weights add their own rounding on top of the quantisation bound.
    assert np.max(np.abs(result["mean"] - plain_mean)) <= bound + 1e-6

    # Nothing stored, logged or published equals (a piece of) any agent's update.
    haystacks = [result["db"], *(m.payload for m in result["messages"])]
    haystacks += [log.encode() for log in result["logs"]]
    haystacks.append(caplog.text.encode())  # the coordinator runs in this process
    for agent, vector in plain.items():
        float_bytes = vector.astype("<f4").tobytes()
        quantised = quantise(vector, clip=0.5, levels=PARAMS.quantisation_levels)
        needles = [float_bytes[i : i + 32] for i in range(0, 256, 32)]
        needles += [quantised.astype("<u4").tobytes()[i : i + 32] for i in range(0, 256, 32)]
        for needle in needles:
            assert all(needle not in hay for hay in haystacks), agent
    for stored in result["stored"]:
        masked = np.frombuffer(stored.payload, "<u4")
        for vector in plain.values():
            assert not np.array_equal(
                masked, quantise(vector, clip=0.5, levels=PARAMS.quantisation_levels)
            )


def test_below_threshold_the_round_fails_with_a_reason_by_its_deadline(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    victims = ["agent-00", "agent-01", "agent-02", "agent-03"]
    result = run_secure_round(tmp_path, mosquitto, topics, "upload", victims)
    outcome = result["outcome"]
    assert not outcome.ok
    assert outcome.reason is not None
    assert "only 2 of 6 agents uploaded masked updates" in outcome.reason
    assert "threshold 3" in outcome.reason
