"""Mosquitto SIGKILLed while an agent is part-way through a transfer, with and without persistence.

Two points that ``test_broker_restarts.py`` does not reach: mid-fetch (an agent holds some
of a release blob's chunks, the broker still holds the rest) and mid-upload (the broker has
some of an update's chunks, the agent is still sending the rest). Each is made observable
rather than timed: chunks are small (1 KiB) so a transfer spans many of them; each agent
reaches the broker through a narrow link (the harness's shaping proxy), and Mosquitto keeps
its default of 20 QoS 1 messages in flight per client, so the rest of a blob waits inside
the broker. The test waits for the first chunk (spooled by the agent, or seen on the
broker), kills the broker at once, and shows from what was seen at that moment that the
transfer was part-way. Then the next rounds must complete with each update counted once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from coordinator.daemon import Coordinator
from coordinator.rounds import RoundOutcome, RoundPlan
from fedge.harness.federation import Federation, federation
from protocol.messages.rounds import ModelRelease
from protocol.topics import TopicKind, Topics
from runtime.launcher import wait_until
from runtime.mosquitto import MosquittoProcess
from tests.brokers import MessageCollector, Received, disconnect, mqtt_client, subscribe
from tests.faults import LinkProfile, TcpProxy
from tests.system.restarts import (
    ROUND_DEADLINE_S,
    checked,
    has_persistence,
    restarting_mosquitto,
    round_completes,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]

NUM_AGENTS = 2
CHUNK_BYTES = 1024
# Mosquitto's own default (the suite's config lifts the limit): beyond 20 unacknowledged
# QoS 1 messages to one client, the broker queues the rest and sends them as acks come.
BROKER_INFLIGHT = 20
NARROW = LinkProfile(name="narrow", latency_s=0.02, bandwidth_bps=200_000)
TRANSFER_TIMEOUT_S = 120.0


@pytest.fixture(params=[True, False], ids=["persistence", "no-persistence"])
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: Path
) -> Iterator[MosquittoProcess]:
    process = restarting_mosquitto(
        mosquitto_binary,
        tmp_path_factory.mktemp("killed-mosquitto"),
        persistence=request.param,
        extra_config=(f"max_inflight_messages {BROKER_INFLIGHT}",),
    )
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def _narrow_fleet(broker: MosquittoProcess, root: Path, topics: Topics) -> Iterator[Federation]:
    """Agents behind narrow links, sending small chunks; the caller starts the coordinator."""
    with ExitStack() as stack:
        links = [
            stack.enter_context(TcpProxy(broker.host, broker.port, profile=NARROW))
            for _ in range(NUM_AGENTS)
        ]
        per_agent = {f"agent-{i:02d}": {"broker_url": link.url} for i, link in enumerate(links)}
        yield stack.enter_context(
            federation(
                root,
                broker,
                topics,
                num_agents=NUM_AGENTS,
                per_agent=per_agent,
                max_chunk_bytes=CHUNK_BYTES,
            )
        )


def _start_coordinator(fed: Federation) -> Coordinator:
    return fed.start_coordinator(max_chunk_bytes=CHUNK_BYTES)


def _partial_fetches(fed: Federation, release: ModelRelease) -> list[tuple[str, str, int, int]]:
    """(agent, blob, chunks spooled, chunk count) of every blob fetch under way."""
    refs = [ref for ref in (release.trainable, release.weights, release.inference) if ref]
    partial = []
    for agent in fed.agents:
        root = agent.data_dir / "federated"
        for ref in refs:
            spooled = len(list((root / "spool" / ref.sha256).glob("*.chunk")))
            if spooled and not (root / "blobs" / ref.sha256).exists():
                partial.append((agent.agent_id, ref.sha256[:12], spooled, ref.chunk_count))
    return partial


def _recovered(
    fed: Federation,
    coordinator: Coordinator,
    broker: MosquittoProcess,
    outcomes: list[RoundOutcome],
) -> None:
    """Rounds 1 and 2 closed, each update counted once, and nobody crashed on the way."""
    assert [o.round for o in outcomes] == [1, 2]
    # The same samples every round: an update counted twice would show as more examples.
    assert len({o.metrics["examples"] for o in outcomes}) == 1, [o.metrics for o in outcomes]
    if not has_persistence(broker):
        assert coordinator.keeper.republished >= 1  # nothing survived: it put its state back
    for agent in fed.agents:
        assert "Traceback" not in agent.log(), agent.log()[-3000:]


def test_rounds_complete_after_the_broker_is_killed_mid_fetch(
    broker: MosquittoProcess, tmp_path: Path
) -> None:
    topics = Topics(root=f"t-midfetch-{uuid.uuid4().hex[:8]}", fleet="test")
    with _narrow_fleet(broker, tmp_path, topics) as fed:
        coordinator = _start_coordinator(fed)
        release = coordinator.runner.current_release()
        # Agents follow the fleet's models: release r0's blobs are on their way to each.
        wait_until(
            lambda: bool(_partial_fetches(fed, release)),
            TRANSFER_TIMEOUT_S,
            what="an agent part-way through fetching r0's blobs",
        )
        broker.kill()
        at_kill = _partial_fetches(fed, release)
        broker.start()
        # Part-way: the broker can have sent at most BROKER_INFLIGHT chunks beyond those an
        # agent had acknowledged (and so spooled), so it died holding the rest.
        assert any(held + BROKER_INFLIGHT < count for _, _, held, count in at_kill), at_kill
        outcomes = [round_completes(fed, coordinator, NUM_AGENTS) for _ in range(2)]
        _recovered(fed, coordinator, broker, outcomes)


def _upload_messages(messages: list[Received], topics: Topics) -> list[tuple[TopicKind, str]]:
    kinds = []
    for message in messages:
        parsed = topics.parse(message.topic)
        kinds.append((parsed.kind, parsed.agent or ""))
    return kinds


def test_rounds_complete_after_the_broker_is_killed_mid_upload(
    broker: MosquittoProcess, tmp_path: Path
) -> None:
    topics = Topics(root=f"t-midupload-{uuid.uuid4().hex[:8]}", fleet="test")
    with _narrow_fleet(broker, tmp_path, topics) as fed:
        coordinator = _start_coordinator(fed)
        fed.wait_for_agents(NUM_AGENTS)
        watched = MessageCollector()
        watcher = mqtt_client(broker, collector=watched)
        try:
            subscribe(watcher, topics.round_updates(1))
            outcomes: list[RoundOutcome] = []
            plan = RoundPlan(rounds=1, min_agents=NUM_AGENTS, deadline_s=ROUND_DEADLINE_S)
            rounds = threading.Thread(
                target=lambda: outcomes.extend(coordinator.run_plan_now(plan)),
                name="test-round",
            )
            rounds.start()

            def first_chunk(messages: list[Received]) -> bool:
                kinds = _upload_messages(messages, topics)
                return any(kind is TopicKind.UPDATE_CHUNK for kind, _ in kinds)

            watched.wait_for(first_chunk, TRANSFER_TIMEOUT_S)
            broker.kill()
            seen = _upload_messages(list(watched.messages), topics)
            broker.start()
        finally:
            disconnect(watcher)
        # Part-way: an agent whose chunks the broker had begun to pass on had not yet sent
        # its completion (which follows its last chunk through the same ordered outbox).
        uploading = {agent for kind, agent in seen if kind is TopicKind.UPDATE_CHUNK}
        completed = {agent for kind, agent in seen if kind is TopicKind.UPDATE_MANIFEST}
        assert uploading - completed, seen
        rounds.join(3 * ROUND_DEADLINE_S)
        assert not rounds.is_alive()
        (first,) = outcomes
        checked(fed, coordinator, first, NUM_AGENTS)
        second = round_completes(fed, coordinator, NUM_AGENTS)
        _recovered(fed, coordinator, broker, [first, second])
