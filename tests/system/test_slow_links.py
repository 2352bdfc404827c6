"""Agents behind slow and lossy links (``fedge.harness.links``'s user-space link simulator).

Short versions: ``bench/links.py`` carries the long runs and prints the times. Tests assert
what happened (rounds closed with every agent, before their deadline; bytes not sent twice;
results kept coming), never how long it took.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from coordinator.tflite_export import ReferenceModels
from fedge.harness.federation import federation
from protocol.chunks import split_blob
from protocol.frames import FrameMeta, encode_envelope
from protocol.messages.agent import InferenceResult
from protocol.messages.codec import decode_message
from protocol.topics import Topics
from runtime.mqtt import MqttLink, parse_broker_url
from runtime.transfer import BlobFetcher
from tests.agent.agent_helpers import agent_settings, held_out_digits, running_agent
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    disconnect,
    mqtt_client,
    publish,
    subscribe,
    wait_until,
)
from tests.faults import LinkProfile, Schedule, ShapedNamespace, TcpProxy, namespaces_available

pytestmark = [pytest.mark.broker, pytest.mark.system]

# The bad link: 300 ms round trips, 256 kbit/s, a 10 s stall every 25 s.
BAD_LINK = LinkProfile(
    name="bad", latency_s=0.15, jitter_s=0.02, bandwidth_bps=256_000, stall_every_s=25.0,
    stall_s=10.0,
)  # fmt: skip
ROUND_DEADLINE_S = 120.0
PLAN_TIMEOUT_S = 300.0
WAIT_S = 120.0


def test_schedule_holds_deliveries_through_stalls_and_loss_bursts() -> None:
    periodic = Schedule(LinkProfile(stall_every_s=10.0, stall_s=4.0), start=100.0)
    assert periodic.open_at(100.0) == 100.0
    assert periodic.open_at(105.9) == 105.9
    assert periodic.open_at(106.0) == 110.0  # down from 6 s to 10 s into every period
    assert periodic.open_at(117.5) == 120.0
    bursty = Schedule(LinkProfile(loss_bursts_per_min=60, loss_burst_s=0.5, seed=3), start=0.0)
    held = [t / 10 for t in range(600) if bursty.open_at(t / 10) > t / 10]
    assert held  # some moments in the first minute fall in a burst
    assert all(bursty.open_at(bursty.open_at(t)) == bursty.open_at(t) for t in held)
    again = Schedule(LinkProfile(loss_bursts_per_min=60, loss_burst_s=0.5, seed=3), start=0.0)
    assert [again.open_at(t) for t in held] == [bursty.open_at(t) for t in held]


def test_agents_behind_a_slow_stalling_link_finish_rounds_before_the_deadline(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        links = [
            stack.enter_context(TcpProxy(mosquitto.host, mosquitto.port, profile=BAD_LINK))
            for _ in range(2)
        ]
        per_agent = {f"agent-{i:02d}": {"broker_url": link.url} for i, link in enumerate(links)}
        fed = stack.enter_context(
            federation(tmp_path, mosquitto, topics, num_agents=2, per_agent=per_agent)
        )
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(2)
        outcomes = coordinator.run_plan_now(
            RoundPlan(rounds=2, min_agents=2, deadline_s=ROUND_DEADLINE_S)
        )
        for outcome in outcomes:
            assert outcome.ok, outcome.reason
            assert outcome.metrics["updates"] == 2
            record = coordinator.state.round(outcome.round)
            assert record is not None
            assert record.finished_at is not None
            # Every agent reported: the round closed before its deadline, not on it.
            assert record.finished_at < record.deadline_at
        assert all(link.bytes_down > 0 and link.bytes_up > 0 for link in links)


@pytest.fixture
def slow_link(mosquitto: MosquittoProcess) -> Iterator[TcpProxy]:
    # Slow enough that the fetch is still running when the test cuts the link.
    profile = LinkProfile(name="slow", latency_s=0.05, bandwidth_bps=2_000_000)
    with TcpProxy(mosquitto.host, mosquitto.port, profile=profile) as proxy:
        yield proxy


def test_a_blob_fetch_resumes_after_a_cut_without_sending_what_arrived_again(
    mosquitto: MosquittoProcess, slow_link: TcpProxy, topics: Topics, tmp_path: Path
) -> None:
    blob = os.urandom(24 * 64 * 1024)  # 24 chunks of 64 KiB
    chunk_bytes = 64 * 1024
    chunk_topic = functools.partial(topics.blob_chunk, "cd" * 32)
    manifest, chunks = split_blob(blob, max_chunk_bytes=chunk_bytes)
    fetchers: list[BlobFetcher] = []
    fetcher_link = MqttLink(
        parse_broker_url(slow_link.url),
        client_id=f"fetch-{topics.root}",
        clean_session=False,
        # The fetcher needs the link, the link its handler: resolved once both exist.
        on_message=lambda topic, payload: fetchers[0].on_message(topic, payload),  # noqa: PLW0108
    )
    with ExitStack() as stack:
        publisher = mqtt_client(mosquitto)
        stack.callback(disconnect, publisher)
        for index, chunk in enumerate(chunks):
            publish(publisher, chunk_topic(index), chunk, retain=True)
        fetcher = BlobFetcher(
            fetcher_link,
            manifest,
            chunk_topic=chunk_topic,
            spool_root=tmp_path / "spool",
        )
        fetchers.append(fetcher)
        fetcher_link.start()
        stack.callback(fetcher_link.stop)
        fetcher.start()
        wait_until(lambda: fetcher.chunks_new >= 8, WAIT_S, what="a third of the chunks")
        slow_link.cut()
        arrived = manifest.chunk_count - len(fetcher.missing)
        down_at_cut = slow_link.bytes_down
        slow_link.restore()
        assert fetcher.wait(WAIT_S) == blob
    resent = slow_link.bytes_down - down_at_cut
    still_missing = manifest.chunk_count - arrived
    # What crossed after the restore: the missing chunks, plus at most the few that were
    # in flight (delivered, their acknowledgement lost with the link), plus MQTT overhead.
    assert arrived < manifest.chunk_count
    assert resent < (still_missing + 3) * (chunk_bytes + 512)
    assert fetcher.chunks_received - fetcher.chunks_new <= 3


# A stall of 10 s from 8 s into every 18 s, so a short test sees one whole stall.
STALLING_LINK = LinkProfile(
    name="stalling", latency_s=0.15, bandwidth_bps=256_000, stall_every_s=18.0, stall_s=10.0
)
FRAMES_PER_S = 4
FRAMES = 4 * 24


def test_results_keep_flowing_through_stalls_with_a_bounded_backlog(
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
    reference_models: ReferenceModels,
) -> None:
    images, _labels = held_out_digits(16)
    results = MessageCollector()
    with ExitStack() as stack:
        link = stack.enter_context(TcpProxy(mosquitto.host, mosquitto.port, profile=STALLING_LINK))
        watcher = mqtt_client(mosquitto, collector=results)
        stack.callback(disconnect, watcher)
        result_topic = topics.agent_results("pi-1")
        subscribe(watcher, result_topic)
        settings = agent_settings(link, topics, tmp_path / "agent", reference_models)
        agent = stack.enter_context(running_agent(**settings))
        camera = mqtt_client(mosquitto)
        stack.callback(disconnect, camera)
        published: dict[str, float] = {}
        largest_outbox = 0
        for number in range(FRAMES):
            frame_id = f"f{number:04d}"
            published[frame_id] = time.monotonic()
            frame = encode_envelope(images[number % len(images)], FrameMeta(frame_id=frame_id))
            publish(camera, topics.camera_frames("door"), frame, qos=0)
            largest_outbox = max(largest_outbox, len(agent.outbox))
            time.sleep(1 / FRAMES_PER_S)  # the camera's frame rate, not a synchronisation
        last = f"f{FRAMES - 1:04d}"
        results.wait_for(
            lambda messages: any(_frame_of(m.payload) == last for m in messages), WAIT_S
        )
        wait_until(lambda: len(agent.outbox) == 0, WAIT_S, what="the outbox to drain")
        counts = agent.intake.counts
    answered = {_frame_of(m.payload) for m in results.on_topic(result_topic)}
    stalled = [f for f, at in published.items() if link.open_at(at) > at]
    before = [f for f, at in published.items() if at < min(published[s] for s in stalled)]
    after = [f for f, at in published.items() if at > max(published[s] for s in stalled)]
    # The run spanned one whole stall.
    assert stalled
    assert before
    assert after
    # Results kept coming: before the stall, and again for the frames after it.
    assert answered & set(before)
    assert answered & set(after)
    # The backlog stayed bounded: the outbox held at most the results of about one stall's
    # worth of frames, and drained; no frame was left unanswered (at 4 fps of small frames
    # the agent keeps up with the burst after a stall; faster cameras get latest-frame-wins).
    assert largest_outbox <= STALLING_LINK.stall_s * FRAMES_PER_S + FRAMES_PER_S
    assert answered == set(published)
    assert counts.processed + counts.dropped_stale + counts.dropped_rate == FRAMES


def _frame_of(payload: bytes) -> str:
    result = decode_message(payload, InferenceResult)
    return result.frame_id


@pytest.mark.skipif(not namespaces_available(), reason="network namespaces need root, ip and tc")
def test_a_publish_from_a_tbf_shaped_namespace_reaches_the_host_broker(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    payload = os.urandom(48 * 1024)
    (tmp_path / "payload.bin").write_bytes(payload)
    received = MessageCollector()
    watcher = mqtt_client(mosquitto, collector=received)
    topic = topics.camera_frames("shaped")
    try:
        subscribe(watcher, topic)
        with ShapedNamespace(256_000, tmp_path / "ns") as namespace:
            namespace.forward(1883, (mosquitto.host, mosquitto.port))
            published = subprocess.run(
                namespace.command(
                    ["mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-q", "1", "-t", topic,
                     "-f", str(tmp_path / "payload.bin")]
                ),
                capture_output=True, text=True, check=False, timeout=WAIT_S,
            )  # fmt: skip
            assert published.returncode == 0, published.stderr
            (message,) = received.wait_for_topic(topic, timeout_s=WAIT_S)
            # Every byte went through the token bucket on the namespace's loopback.
            assert namespace.sent_bytes() >= len(payload)
    finally:
        disconnect(watcher)
    assert message.payload == payload
