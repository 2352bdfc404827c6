"""The agent under hostile input and overload, through a real Mosquitto.

Garbage on frame and command topics must give error events, never a dead thread or a
growing backlog; a camera faster than the model must cost skipped frames, never memory.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage import data as skimage_data

from agent.daemon import Agent
from coordinator.tflite_export import ReferenceModels
from protocol.frames import FrameMeta, encode_envelope, encode_json_envelope
from protocol.messages.agent import CommandAck, ErrorEvent, InferenceResult
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.commands import LabelFrame, Ping, RequestStatus, SetOptions
from protocol.topics import Topics
from tests.agent.agent_helpers import (
    RESULT_TIMEOUT_S,
    agent_settings,
    decoded,
    held_out_digits,
    running_agent,
)
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    disconnect,
    mqtt_client,
    publish,
    subscribe,
    wait_until,
)

pytestmark = pytest.mark.broker

Watcher = tuple[Any, MessageCollector]

FUZZ_SEED = 20_261_128
FUZZ_EXAMPLES = 1000
MUTATED_PAYLOADS = 1000
MAX_FUZZ_BYTES = 4096
FUZZ_CAMERAS = ("fz0", "fz1", "fz2")
FLOOD_FRAMES = 3000
FLOOD_DIGITS = 5
SETTLE_TIMEOUT_S = 60.0
BUSY_PING_ATTEMPTS = 20
MAX_RSS_GROWTH_BYTES = 200 * 1024 * 1024
_KIB = 1024
CAMERAMAN = skimage_data.camera()  # type: ignore[no-untyped-call]


@pytest.fixture
def watcher(mosquitto: MosquittoProcess, topics: Topics) -> Iterator[Watcher]:
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    subscribe(client, f"{topics.root}/#")
    yield client, collector
    disconnect(client)


def _rss_bytes() -> int:
    """This process's resident set size, from the kernel's own accounting."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * _KIB
    raise AssertionError("no VmRSS line in /proc/self/status")


BUSY_PING_ATTEMPTS = 20


def _seed_payloads() -> list[bytes]:
    """Real, valid payloads of every shape the agent accepts: the fuzzer's starting points."""
    digit = held_out_digits(1)[0][0]
    small_photo = cv2.resize(CAMERAMAN, (64, 64), interpolation=cv2.INTER_AREA)
    jpeg = cv2.imencode(".jpg", small_photo)[1].tobytes()
    meta = FrameMeta(frame_id="fuzz-1", timestamp=1.0)
    return [
        digit,
        jpeg,
        encode_envelope(digit, meta),
        encode_json_envelope(jpeg, meta),
        encode_message(Ping(command_id="fuzz-ping")),
        encode_message(RequestStatus(command_id="fuzz-status")),
        encode_message(SetOptions(command_id="fuzz-options", top_k=2, threshold=0.1)),
        encode_message(LabelFrame(command_id="fuzz-label", frame_id="nope", label="3")),
    ]


def _mutate(payload: bytes, rng: random.Random) -> bytes:
    """One random structural damage: truncate, flip bytes, splice noise or repeat a run."""
    data = bytearray(payload)
    choice = rng.randrange(4)
    if choice == 0:
        return bytes(data[: rng.randrange(len(data) + 1)])
    if choice == 1:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    at = rng.randrange(len(data) + 1)
    if choice == 2:
        noise = rng.randbytes(rng.randint(1, 64))
        return bytes(data[:at] + noise + data[at:])
    run = data[at : at + rng.randint(1, 32)]
    return bytes(data[:at] + run * rng.randint(2, 16) + data[at:])[:MAX_FUZZ_BYTES]


def _damaged(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A real payload cut short and given an arbitrary tail."""

    def cut(seed: bytes) -> st.SearchStrategy[bytes]:
        return st.tuples(st.integers(0, len(seed)), st.binary(max_size=256)).map(
            lambda cut_tail: (seed[: cut_tail[0]] + cut_tail[1])[:MAX_FUZZ_BYTES]
        )

    return st.sampled_from(seeds).flatmap(cut)


def _wait_settled(agent: Agent) -> None:
    """Every received frame accounted for: nothing pending, nothing mid-flight."""

    def settled() -> bool:
        counts = agent.intake.counts
        accounted = counts.processed + counts.dropped_stale + counts.dropped_rate
        return agent.intake.pending_count == 0 and accounted + counts.rejected == counts.received

    wait_until(settled, SETTLE_TIMEOUT_S, what="every received frame to be accounted for")


def _result_from(collector: MessageCollector, topic: str, source: str) -> InferenceResult:
    def arrived(_messages: object) -> bool:
        return any(r.source == source for r in decoded(collector.on_topic(topic)))

    collector.wait_for(arrived, RESULT_TIMEOUT_S)
    result = next(r for r in decoded(collector.on_topic(topic)) if r.source == source)
    assert isinstance(result, InferenceResult)
    return result


def _ack_for(collector: MessageCollector, topic: str, command_id: str) -> CommandAck:
    def is_ack(event: object) -> bool:
        return isinstance(event, CommandAck) and event.command_id == command_id

    collector.wait_for(
        lambda _m: any(is_ack(e) for e in decoded(collector.on_topic(topic))), RESULT_TIMEOUT_S
    )
    ack = next(e for e in decoded(collector.on_topic(topic)) if is_ack(e))
    assert isinstance(ack, CommandAck)
    return ack


def _ping_through_the_backlog(
    client: Any, collector: MessageCollector, commands: str, events: str
) -> CommandAck:
    """A ping answered after the fuzz; sent again only if the agent said it was too busy.

    Under load the fuzz can fill the agent's bounded command queue; a ping that arrives then
    is refused with a ``busy`` error event (that refusal is the behaviour under test too),
    so the ping is repeated, each time after such a refusal, never on a timer alone.
    """
    for attempt in range(BUSY_PING_ATTEMPTS):
        busy_before = _busy_refusals(collector, events)
        command_id = f"after-fuzz-{attempt}"
        publish(client, commands, encode_message(Ping(command_id=command_id)))

        def answered_or_refused(
            _messages: object, command_id: str = command_id, busy_before: int = busy_before
        ) -> bool:
            acked = any(
                isinstance(e, CommandAck) and e.command_id == command_id
                for e in decoded(collector.on_topic(events))
            )
            return acked or _busy_refusals(collector, events) > busy_before

        collector.wait_for(answered_or_refused, RESULT_TIMEOUT_S)
        for event in decoded(collector.on_topic(events)):
            if isinstance(event, CommandAck) and event.command_id == command_id:
                return event
    raise AssertionError(f"the agent was still busy after {BUSY_PING_ATTEMPTS} pings")


def _busy_refusals(collector: MessageCollector, events: str) -> int:
    return sum(
        1
        for e in decoded(collector.on_topic(events))
        if isinstance(e, ErrorEvent) and e.reason == "busy"
    )


def test_fuzzed_frames_and_commands_never_break_the_agent(
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: Watcher,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    client, collector = watcher
    agent_id = "pi-1"
    commands, events = topics.agent_commands(agent_id), topics.agent_events(agent_id)
    results = topics.agent_results(agent_id)
    seeds = _seed_payloads()
    sent = [0]

    def send(payload: bytes) -> None:
        camera = FUZZ_CAMERAS[sent[0] % len(FUZZ_CAMERAS)]
        sent[0] += 1
        publish(client, topics.camera_frames(camera), payload, qos=0)
        publish(client, commands, payload, qos=0)

    rss_before = _rss_bytes()
    with running_agent(**agent_settings(mosquitto, topics, tmp_path, reference_models)) as agent:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.binary(max_size=MAX_FUZZ_BYTES) | _damaged(seeds))
        def fuzz(payload: bytes) -> None:
            send(payload)

        fuzz()
        rng = random.Random(FUZZ_SEED)
        for _ in range(MUTATED_PAYLOADS):
            send(_mutate(rng.choice(seeds), rng))

        # Commands are answered in order: this ack means every fuzzed command was handled.
        assert _ping_through_the_backlog(client, collector, commands, events).ok
        digit = held_out_digits(1)[0][0]
        publish(client, topics.camera_frames("after-fuzz"), digit, qos=0)
        result = _result_from(collector, results, "after-fuzz")
        assert result.predictions
        _wait_settled(agent)
        wait_until(lambda: len(agent.outbox) == 0, SETTLE_TIMEOUT_S, what="the outbox to drain")
        collector.wait_for(
            lambda _m: len(collector.on_topic(events)) >= agent.errors_emitted, RESULT_TIMEOUT_S
        )
        threads_alive = [thread.is_alive() for thread in agent._threads]
        pending = agent.intake.pending_count
        with agent._recent_lock:
            recent = len(agent._recent)
        counts = agent.intake.counts
        errors_emitted = agent.errors_emitted
    rss_growth = _rss_bytes() - rss_before
    emitted = decoded(collector.on_topic(events))
    print(
        f"fuzz: {sent[0]} payloads x 2 topics; frames {counts}; error events {errors_emitted}; "
        f"events seen {len(emitted)}; recent {recent}; RSS growth {rss_growth / 2**20:.1f} MiB"
    )
    assert threads_alive
    assert all(threads_alive)
    assert sent[0] >= FUZZ_EXAMPLES + MUTATED_PAYLOADS
    assert pending <= len(FUZZ_CAMERAS) + 1
    assert recent <= agent.config.recent_frames
    assert rss_growth < MAX_RSS_GROWTH_BYTES
    assert errors_emitted > 0
    assert counts.rejected > 0
    assert any(isinstance(event, ErrorEvent) for event in emitted)
    assert all(isinstance(event, ErrorEvent | CommandAck) for event in emitted)
    for message in collector.on_topic(events):
        assert isinstance(decode_message(message.payload), ErrorEvent | CommandAck)


def _flood(client: Any, topic: str, frames: list[bytes], count: int) -> None:
    """Publish ``count`` frames QoS 0 as fast as paho takes them; return once all left."""
    last = None
    for n in range(count):
        last = client.publish(topic, frames[n % len(frames)], qos=0)
    assert last is not None
    last.wait_for_publish(RESULT_TIMEOUT_S)
    assert last.is_published()


@pytest.mark.parametrize(
    ("max_fps", "skipped"),
    [
        (None, lambda c: c.dropped_stale),
        (5.0, lambda c: c.dropped_rate),
    ],
    ids=["latest-frame-wins", "max-fps-5"],
)
def test_a_camera_faster_than_the_model_costs_frames_not_memory(
    max_fps: float | None,
    skipped: Callable[[Any], int],
    mosquitto: MosquittoProcess,
    topics: Topics,
    watcher: Watcher,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    client, collector = watcher
    results = topics.agent_results("pi-1")
    digits = held_out_digits(FLOOD_DIGITS)[0]
    settings_ = agent_settings(mosquitto, topics, tmp_path, reference_models, max_fps=max_fps)
    rss_before = _rss_bytes()
    with running_agent(**settings_) as agent:
        _flood(client, topics.camera_frames("fast"), digits, FLOOD_FRAMES)
        # Same client, same QoS: the broker delivers this after every flooded frame.
        publish(client, topics.camera_frames("sentinel"), digits[0], qos=0)
        _result_from(collector, results, "sentinel")
        _wait_settled(agent)
        counts = agent.intake.counts
        collector.wait_for_topic(results, counts.processed, RESULT_TIMEOUT_S)
        wait_until(lambda: len(agent.outbox) == 0, SETTLE_TIMEOUT_S, what="the outbox to drain")
        results_seen = len(collector.on_topic(results))
    rss_growth = _rss_bytes() - rss_before
    published = FLOOD_FRAMES + 1
    print(
        f"flood (max_fps={max_fps}): published {published}; frames {counts}; "
        f"results {results_seen}; RSS growth {rss_growth / 2**20:.1f} MiB"
    )
    assert counts.received >= 0.9 * published
    assert counts.received <= published
    assert (
        counts.processed + counts.dropped_stale + counts.dropped_rate + counts.rejected
        == counts.received
    )
    assert counts.rejected == 0
    assert counts.dropped_stale + counts.dropped_rate > 0
    assert skipped(counts) > 0
    assert counts.processed < counts.received
    assert results_seen == counts.processed
    assert rss_growth < MAX_RSS_GROWTH_BYTES
