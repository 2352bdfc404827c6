"""Federated rounds through a real Mosquitto while agents, the broker or the coordinator fail."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from coordinator.daemon import Coordinator
from coordinator.rounds import RoundOutcome, RoundPlan
from coordinator.state import CoordinatorState
from fedge.harness.federation import AgentProcess, Federation, federation
from protocol.chunks import CHUNK_HEADER_BYTES, DEFAULT_MAX_CHUNK_BYTES
from protocol.errors import FedgeError
from protocol.messages.codec import decode_message
from protocol.messages.rounds import CoordinatorState as Phase
from protocol.messages.rounds import CoordinatorStatus, ModelRelease, RoundConfig, UpdateEncoding
from protocol.topics import Topics
from protocol.updates import decode_weights
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    subscribe,
    wait_until,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]

ANNOUNCED_TIMEOUT_S = 60.0
PLAN_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 60.0
# Room for a PUBLISH's fixed header, topic and packet id on top of a full 128 KiB chunk.
PACKET_OVERHEAD_BYTES = 512
CAPPED_PACKET_BYTES = DEFAULT_MAX_CHUNK_BYTES + PACKET_OVERHEAD_BYTES
OVERSIZED_PAYLOAD_BYTES = CAPPED_PACKET_BYTES + 1024
SOCKET_TIMEOUT_S = 10.0


def _run_plan_in_background(
    pool: ThreadPoolExecutor, coordinator: Coordinator, plan: RoundPlan
) -> Future[list[RoundOutcome]]:
    return pool.submit(coordinator.run_plan_now, plan)


def _wait_announced(coordinator: Coordinator, number: int) -> None:
    wait_until(
        lambda: coordinator.state.round(number) is not None,
        ANNOUNCED_TIMEOUT_S,
        what=f"round {number} to be announced",
    )


def _agents_in_updates(coordinator: Coordinator, number: int) -> list[str]:
    return [update.agent for update in coordinator.state.updates(number)]


def _all_agent_ids(fed: Federation) -> list[str]:
    return sorted(agent.agent_id for agent in fed.agents)


def test_agent_killed_mid_round_leaves_a_quorum_and_rejoins_after_a_restart(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with federation(tmp_path, mosquitto, topics, num_agents=3) as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(3)
        victim = fed.agents[2]
        with ThreadPoolExecutor(1) as pool:
            future = _run_plan_in_background(
                pool, coordinator, RoundPlan(rounds=1, min_agents=2, deadline_s=10.0)
            )
            _wait_announced(coordinator, 1)
            victim.kill()
            (first,) = future.result(PLAN_TIMEOUT_S)
        assert first.ok, first.reason
        record = coordinator.state.round(1)
        assert record is not None
        assert record.state == "done"
        reported = _agents_in_updates(coordinator, 1)
        if victim.agent_id in reported:
            # It reported before the kill landed: nothing was missing.
            assert reported == _all_agent_ids(fed)
        else:
            # The round waited for the dead agent until its deadline, then closed on quorum.
            assert reported == sorted(a.agent_id for a in fed.agents[:2])
            assert first.metrics["updates"] == 2
            assert record.finished_at is not None
            assert record.finished_at >= record.deadline_at
        assert first.metrics["selected"] == 3

        victim.start()
        fed.wait_for_agents(3)
        (second,) = coordinator.run_plan_now(RoundPlan(rounds=1, min_agents=3, deadline_s=40.0))
        assert second.ok, second.reason
        assert second.metrics["updates"] == 3
        assert _agents_in_updates(coordinator, 2) == _all_agent_ids(fed)
        assert "Traceback" not in victim.log()


def test_broker_killed_and_restarted_mid_round_loses_and_duplicates_nothing(
    fresh_mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with federation(tmp_path, fresh_mosquitto, topics, num_agents=3) as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(3)
        watcher = MessageCollector()
        client = mqtt_client(fresh_mosquitto, collector=watcher)
        try:
            subscribe(client, topics.round_current())
            with ThreadPoolExecutor(1) as pool:
                future = _run_plan_in_background(
                    pool, coordinator, RoundPlan(rounds=1, min_agents=3, deadline_s=40.0)
                )
                # The retained announcement reaching a subscriber means the broker also
                # processed the coordinator's earlier SUBSCRIBE to the round's update topics.
                watcher.wait_for_topic(topics.round_current(), timeout_s=ANNOUNCED_TIMEOUT_S)
                disconnect(client)
                # A SIGKILL keeps only what the last database write holds: persistent
                # sessions with their subscriptions and queued QoS 1 messages, and retained
                # messages (release chunks, manifests, the announcement, statuses). Written
                # now, so nothing the round needs depends on the autosave timer.
                fresh_mosquitto.persist()
                fresh_mosquitto.kill()
                fresh_mosquitto.start()
                (first,) = future.result(PLAN_TIMEOUT_S)
        finally:
            disconnect(client)
        assert first.ok, first.reason
        assert first.metrics["updates"] == 3
        stored = coordinator.state.updates(1)
        assert [update.agent for update in stored] == _all_agent_ids(fed)
        assert first.metrics["examples"] == sum(update.num_examples for update in stored)

        (second,) = coordinator.run_plan_now(RoundPlan(rounds=1, min_agents=3, deadline_s=40.0))
        assert second.ok, second.reason
        assert _agents_in_updates(coordinator, 2) == _all_agent_ids(fed)
        for agent in fed.agents:
            assert "Traceback" not in agent.log()


def _statuses(messages: list[Received], topic: str) -> list[CoordinatorStatus]:
    found = []
    for message in messages:
        if message.topic != topic or not message.payload:
            continue
        try:
            found.append(decode_message(message.payload, CoordinatorStatus))
        except FedgeError:
            continue
    return found


def _status_seen(
    topic: str, wanted: Callable[[CoordinatorStatus], bool]
) -> Callable[[list[Received]], bool]:
    return lambda messages: any(wanted(status) for status in _statuses(messages, topic))


def _is_ready(status: CoordinatorStatus) -> bool:
    """An idle coordinator that has published its current release.

    Coordinator.start() (coordinator/daemon.py) publishes an idle status from its connect
    callback, then republishes the release, then resumes a pending plan. A start_rounds
    command handled in between starts the plan's worker, and the following resume then
    raises "rounds are already running" out of start(): the daemon exits.
    """
    return status.state is Phase.IDLE and status.model_version is not None


def _round_start(fed: Federation, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "round",
            "start",
            "--broker",
            fed.broker.url,
            "--fleet",
            fed.topics.fleet,
            "--root",
            fed.topics.root,
            *arguments,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=CLI_TIMEOUT_S,
    )


def test_coordinator_killed_mid_round_resumes_the_plan_after_a_restart(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with federation(tmp_path, mosquitto, topics, num_agents=3) as fed:
        watcher = MessageCollector()
        client = mqtt_client(mosquitto, collector=watcher)
        status_topic = topics.coordinator_status()
        try:
            subscribe(client, status_topic)
            coordinator = fed.start_coordinator_process()
            # Not the idle status sent on connecting: a command arriving before start() has
            # looked for a plan to resume crashes the daemon (see _is_ready). The one naming
            # the initial release comes after the release was published.
            watcher.wait_for(_status_seen(status_topic, _is_ready), CLI_TIMEOUT_S)
            started = _round_start(fed, "--rounds", "2", "--min-agents", "3", "--deadline", "30s")
            assert started.returncode == 0, started.stdout + started.stderr
            watcher.wait_for(
                _status_seen(status_topic, lambda s: s.state is Phase.ANNOUNCED and s.round == 1),
                ANNOUNCED_TIMEOUT_S,
            )
            coordinator.kill()
            # Its last will marks it offline; after that, every status is the new process's.
            watcher.wait_for(
                _status_seen(status_topic, lambda s: s.state is Phase.OFFLINE), CLI_TIMEOUT_S
            )
            watcher.clear()
            coordinator.start()
            after_restart = watcher.wait_for(
                _status_seen(status_topic, lambda s: s.state is Phase.IDLE and s.round == 2),
                PLAN_TIMEOUT_S,
            )
            coordinator.stop()
        finally:
            disconnect(client)
        assert "Traceback" not in coordinator.log(), coordinator.log()[-3000:]
        # The new process carried on with round 1 rather than starting the plan afresh.
        assert any(
            s.state is Phase.ANNOUNCED and s.round == 1
            for s in _statuses(after_restart, status_topic)
        )
        state = CoordinatorState(tmp_path / "coordinator" / "coordinator.sqlite")
        try:
            assert [(r.round, r.state) for r in state.rounds()] == [(1, "done"), (2, "done")]
            for number in (1, 2):
                assert [u.agent for u in state.updates(number)] == _all_agent_ids(fed)
            assert state.get("plan") is None
            assert state.get("current_version") == "r2"
            resumed = _weights_of(state, "r1")
        finally:
            state.close()
    # Same shares, same initial weights, same round seed: the crash changed nothing.
    reference = _uncrashed_round_one(
        mosquitto, Topics(root=topics.root, fleet="reference"), tmp_path
    )
    assert len(resumed) == len(reference)
    for got, expected in zip(resumed, reference, strict=True):
        np.testing.assert_array_equal(got, expected)


def _weights_of(state: CoordinatorState, version: str) -> list[np.ndarray]:
    release = _released_refs(state, version)
    return decode_weights(state.blob(release.weights.sha256))


def _uncrashed_round_one(
    broker: MosquittoProcess, topics: Topics, tmp_path: Path
) -> list[np.ndarray]:
    """Round 1 as `fedge round start` plans it by default, run without a crash."""
    with federation(tmp_path / "reference", broker, topics, num_agents=3) as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(3)
        config = RoundConfig(epochs=1, learning_rate=0.05, update_encoding=UpdateEncoding.FLOAT32)
        (outcome,) = coordinator.run_plan_now(
            RoundPlan(rounds=1, min_agents=3, deadline_s=30.0, config=config)
        )
        assert outcome.ok, outcome.reason
        return _weights_of(coordinator.state, "r1")


def test_agent_offline_during_the_announcement_catches_up_from_the_retained_one(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with federation(tmp_path, mosquitto, topics, num_agents=3) as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(3)
        late = fed.agents[2]
        with ThreadPoolExecutor(1) as pool:
            future = _run_plan_in_background(
                pool, coordinator, RoundPlan(rounds=1, min_agents=3, deadline_s=40.0)
            )
            _wait_announced(coordinator, 1)
            late.kill()
            # The agent marks a round done once its update is in its outbox.
            done_before_kill = 1 in _rounds_done(late)
            late.start()
            (outcome,) = future.result(PLAN_TIMEOUT_S)
        assert outcome.ok, outcome.reason
        assert outcome.metrics["updates"] == 3
        assert _agents_in_updates(coordinator, 1) == _all_agent_ids(fed)
        if not done_before_kill:
            # So the restarted process trained round 1 from the retained announcement.
            wait_until(lambda: 1 in _rounds_done(late), 30.0, what="the late agent's round 1")
        assert "Traceback" not in late.log()


def _rounds_done(agent: AgentProcess) -> set[int]:
    path = agent.data_dir / "federated" / "federated.json"
    if not path.exists():
        return set()
    return set(json.loads(path.read_text())["rounds_done"])


@pytest.fixture
def capped_mosquitto(
    tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: Path
) -> Iterator[MosquittoProcess]:
    """A Mosquitto that disconnects any client sending a packet above 128 KiB + overhead."""
    binary = mosquitto_binary
    broker = MosquittoProcess(
        binary,
        tmp_path_factory.mktemp("capped-mosquitto"),
        extra_config=[f"max_packet_size {CAPPED_PACKET_BYTES}"],
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _mqtt_string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _broker_drops_oversized_publish(broker: MosquittoProcess, topic: str) -> bool:
    """Send one QoS 0 PUBLISH above the cap over a raw socket; True if the broker hangs up."""
    connect_body = _mqtt_string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 10)
    connect_body += _mqtt_string("oversized-probe")
    publish_body = _mqtt_string(topic) + b"\0" * OVERSIZED_PAYLOAD_BYTES
    with socket.create_connection((broker.host, broker.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(b"\x10" + _remaining_length(len(connect_body)) + connect_body)
        connack = sock.recv(4)
        assert connack[:1] == b"\x20", connack
        try:
            sock.sendall(b"\x30" + _remaining_length(len(publish_body)) + publish_body)
            return sock.recv(16) == b""
        except ConnectionResetError:
            return True


def _released_refs(state: CoordinatorState, version: str) -> ModelRelease:
    text = state.release_json(version)
    assert text is not None, version
    return ModelRelease.model_validate_json(text)


def test_a_round_fits_a_broker_that_caps_packets_at_128_kib(
    capped_mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    assert _broker_drops_oversized_publish(capped_mosquitto, topics.coordinator_events())
    with federation(tmp_path, capped_mosquitto, topics, num_agents=3) as fed:
        # Inference files too, so every kind of release blob crosses the capped broker.
        coordinator = fed.start_coordinator(with_inference_files=True)
        fed.wait_for_agents(3)
        (outcome,) = coordinator.run_plan_now(RoundPlan(rounds=1, min_agents=3, deadline_s=40.0))
        assert outcome.ok, outcome.reason
        assert outcome.metrics["updates"] == 3
        assert _agents_in_updates(coordinator, 1) == _all_agent_ids(fed)
        releases = [_released_refs(coordinator.state, v) for v in ("r0", "r1")]
        refs = [
            ref
            for release in releases
            for ref in (
                release.weights,
                release.trainable,
                release.inference,
                release.inference_int8,
            )
            if ref is not None
        ]
        assert len(refs) == 8
        for ref in refs:
            assert ref.chunk_bytes + CHUNK_HEADER_BYTES <= DEFAULT_MAX_CHUNK_BYTES, ref
            assert ref.chunk_count == -(-ref.size_bytes // ref.chunk_bytes), ref
        for agent in fed.agents:
            assert "Traceback" not in agent.log()
