"""The agent under faults: a broker crash and an agent crash lose no result.

Results are delivered at least once: a redelivery (an unacknowledged QoS 1 message sent
again, or an outbox row replayed after a restart) reaches consumers twice, and consumers
deduplicate by ``frame_id``. These tests therefore allow repeats, but only as identical
copies of one result.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from agent.intake import PendingFrame
from coordinator.tflite_export import ReferenceModels
from protocol.frames import FrameMeta, encode_envelope
from protocol.messages.agent import AgentState, AgentStatus, InferenceResult
from protocol.messages.codec import decode_message
from protocol.topics import Topics
from tests.agent.agent_helpers import (
    RESULT_TIMEOUT_S,
    agent_settings,
    held_out_digits,
    running_agent,
    write_agent_toml,
)
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    publish,
    subscribe,
    wait_until,
)
from tests.faults import TcpProxy

pytestmark = pytest.mark.broker

BEFORE_CRASH = 6
DURING_OUTAGE = 8
HELD_FRAMES = 10
PROCESS_START_TIMEOUT_S = 120.0
PROCESS_EXIT_TIMEOUT_S = 30.0
OUTBOX_TIMEOUT_S = 60.0


def _frame(image: bytes, frame_id: str) -> bytes:
    return encode_envelope(image, FrameMeta(frame_id=frame_id))


def _results_by_frame(messages: list[Received], topic: str) -> dict[str, set[bytes]]:
    """Every distinct payload seen per frame id on ``topic``."""
    found: dict[str, set[bytes]] = {}
    for message in messages:
        if message.topic != topic:
            continue
        result = decode_message(message.payload, InferenceResult)
        found.setdefault(result.frame_id, set()).add(message.payload)
    return found


def _has_frames(topic: str, frame_ids: set[str]) -> Callable[[list[Received]], bool]:
    def holds(messages: list[Received]) -> bool:
        return frame_ids <= set(_results_by_frame(messages, topic))

    return holds


def _assert_one_result_per_frame(found: dict[str, set[bytes]], frame_ids: set[str]) -> None:
    assert set(found) == frame_ids
    # A repeat is a redelivery of the same bytes, never a second, different result.
    repeated = {frame_id: len(payloads) for frame_id, payloads in found.items()}
    assert all(count == 1 for count in repeated.values()), repeated


def test_results_survive_a_broker_crash(
    fresh_mosquitto: MosquittoProcess,
    topics: Topics,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    images, _ = held_out_digits(BEFORE_CRASH + DURING_OUTAGE)
    results_topic = topics.agent_results("pi-1")
    watcher_id = f"watcher-{topics.root}"[:64]
    before = MessageCollector()
    watcher = mqtt_client(
        fresh_mosquitto, client_id=watcher_id, clean_session=False, collector=before
    )
    subscribe(watcher, results_topic)
    # The persistent session and its subscription must outlive the SIGKILL below.
    fresh_mosquitto.persist()
    publisher = mqtt_client(fresh_mosquitto)
    after = MessageCollector()
    first_ids = {f"f-{n}" for n in range(BEFORE_CRASH)}
    outage_ids = {f"f-{n}" for n in range(BEFORE_CRASH, BEFORE_CRASH + DURING_OUTAGE)}
    settings = agent_settings(fresh_mosquitto, topics, tmp_path, reference_models)
    try:
        with running_agent(**settings) as agent:
            for n in range(BEFORE_CRASH):
                # One camera per frame: latest-frame-wins never drops any of them.
                publish(publisher, topics.camera_frames(f"cam{n}"), _frame(images[n], f"f-{n}"))
            before.wait_for(_has_frames(results_topic, first_ids), RESULT_TIMEOUT_S)
            disconnect(publisher)
            fresh_mosquitto.kill()
            disconnect(watcher)  # stops its reconnect attempts; the session stays on disk
            wait_until(
                lambda: not agent.link.is_connected,
                RESULT_TIMEOUT_S,
                what="the agent to notice the broker is gone",
            )
            for n in range(BEFORE_CRASH, BEFORE_CRASH + DURING_OUTAGE):
                # Frames the agent had received just before the broker went down.
                agent.intake.offer(
                    PendingFrame(
                        source=f"cam{n}",
                        topic=topics.camera_frames(f"cam{n}"),
                        payload=_frame(images[n], f"f-{n}"),
                        received_at=time.time(),
                    )
                )
            total = BEFORE_CRASH + DURING_OUTAGE
            # The counter moves just before the result is written: wait for both.
            wait_until(
                lambda: (
                    agent.intake.counts.processed >= total and len(agent.outbox) >= DURING_OUTAGE
                ),
                RESULT_TIMEOUT_S,
                what=f"the agent to process {total} frames into its outbox",
            )
            fresh_mosquitto.start()
            watcher = mqtt_client(
                fresh_mosquitto, client_id=watcher_id, clean_session=False, collector=after
            )
            subscribe(watcher, results_topic)
            after.wait_for(_has_frames(results_topic, outage_ids), RESULT_TIMEOUT_S)
            wait_until(lambda: len(agent.outbox) == 0, OUTBOX_TIMEOUT_S, what="the outbox to drain")
            assert agent.intake.counts.processed == total
            assert agent.intake.counts.rejected == 0
    finally:
        disconnect(publisher)
        disconnect(watcher)
    # Consumers dedupe by frame_id: QoS 1 may deliver a result again after the crash.
    found = _results_by_frame(before.messages + after.messages, results_topic)
    _assert_one_result_per_frame(found, first_ids | outage_ids)


def _start_agent(config_path: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedge", "agent", "run", "--config", str(config_path)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _end(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(PROCESS_EXIT_TIMEOUT_S)


def _outbox_frame_ids(outbox_path: Path, results_topic: str) -> set[str]:
    """Frame ids of the results waiting in an agent's outbox, read without touching it."""
    if not outbox_path.is_file():
        return set()
    db = sqlite3.connect(f"file:{outbox_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE topic = ?", (results_topic,)).fetchall()
    except sqlite3.OperationalError:
        return set()  # the agent has not created its tables yet
    finally:
        db.close()
    ids = set()
    for (payload,) in rows:
        result = decode_message(bytes(payload), InferenceResult)
        ids.add(result.frame_id)
    return ids


def _outbox_rows(outbox_path: Path) -> int:
    db = sqlite3.connect(f"file:{outbox_path}?mode=ro", uri=True)
    try:
        (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
    finally:
        db.close()
    return int(count)


@pytest.fixture
def agent_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    with (tmp_path / "agent.log").open("ab") as log:
        yield log


def test_unacknowledged_results_are_replayed_after_an_agent_crash(
    fresh_mosquitto: MosquittoProcess,
    topics: Topics,
    reference_models: ReferenceModels,
    tmp_path: Path,
    agent_log: IO[bytes],
) -> None:
    images, _ = held_out_digits(HELD_FRAMES + 1)
    results_topic = topics.agent_results("pi-1")
    status_topic = topics.agent_status("pi-1")
    data_dir = tmp_path / "agent-data"
    outbox_path = data_dir / "outbox.sqlite"
    collector = MessageCollector()
    watcher = mqtt_client(fresh_mosquitto, collector=collector)
    subscribe(watcher, results_topic)
    subscribe(watcher, status_topic)
    held_ids = {f"held-{n}" for n in range(HELD_FRAMES)}
    process: subprocess.Popen[bytes] | None = None
    try:
        with TcpProxy(fresh_mosquitto.host, fresh_mosquitto.port) as proxy:
            through_proxy = tmp_path / "through-proxy.toml"
            settings = agent_settings(fresh_mosquitto, topics, data_dir, reference_models)
            write_agent_toml(through_proxy, settings | {"broker_url": proxy.url})
            process = _start_agent(through_proxy, agent_log)

            def online(messages: list[Received]) -> bool:
                statuses = [
                    decode_message(m.payload, AgentStatus)
                    for m in messages
                    if m.topic == status_topic
                ]
                return any(s.state is AgentState.ONLINE for s in statuses)

            collector.wait_for(online, PROCESS_START_TIMEOUT_S)
            assert proxy.connections == 1
            # One result end to end proves the path through the proxy.
            publish(watcher, topics.camera_frames("warm-up"), _frame(images[-1], "warm-up"))
            collector.wait_for(_has_frames(results_topic, {"warm-up"}), RESULT_TIMEOUT_S)
            wait_until(
                lambda: _outbox_rows(outbox_path) == 0,
                OUTBOX_TIMEOUT_S,
                what="the warm-up result to be acknowledged",
            )
            proxy.hold_upstream()
            for n in range(HELD_FRAMES):
                publish(watcher, topics.camera_frames(f"cam{n}"), _frame(images[n], f"held-{n}"))
            wait_until(
                lambda: _outbox_frame_ids(outbox_path, results_topic) >= held_ids,
                OUTBOX_TIMEOUT_S,
                what=f"{HELD_FRAMES} results in the agent's outbox",
            )
            process.kill()
            process.wait(PROCESS_EXIT_TIMEOUT_S)
            assert proxy.held_bytes > 0
        # The broker never saw these results: nothing went out before the crash.
        assert not set(_results_by_frame(collector.messages, results_topic)) & held_ids
        direct = tmp_path / "direct.toml"
        write_agent_toml(direct, settings)
        process = _start_agent(direct, agent_log)
        collector.wait_for(_has_frames(results_topic, held_ids), PROCESS_START_TIMEOUT_S)
        wait_until(
            lambda: _outbox_rows(outbox_path) == 0, OUTBOX_TIMEOUT_S, what="the outbox to drain"
        )
        assert process.poll() is None, (tmp_path / "agent.log").read_text(errors="replace")
    finally:
        _end(process)
        disconnect(watcher)
    found = _results_by_frame(collector.messages, results_topic)
    _assert_one_result_per_frame(found, held_ids | {"warm-up"})
