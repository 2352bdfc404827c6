"""Bad input to federated rounds through a real Mosquitto, with real LiteRT agent processes.

A test client plays a misbehaving agent: it publishes crafted update chunks and completion
messages on a round's topics (wrong shapes, NaN, an absurd norm, replays of an earlier
round, an agent that was not selected, hashes that do not match the chunks). The
coordinator must refuse each with an ``error`` event on its events topic naming the
reason, and the round must still close with the real agents' updates and only theirs.

On the agents' side, forged, unsigned and tampered round announcements on the retained
current-round topic must each be refused with an ``error`` event, must not start any
training, and must not keep the agents from the next genuine round.

One federation serves the whole module; the bad updates all go into one round, which the
fixture ``bad_round`` runs once, and each case is its own test over what that round saw.
Impostor agents announce themselves as able to train, so the coordinator selects them and
the round stays open until its deadline: every injection lands while the round is open,
whatever the real agents' pace.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from safetensors.numpy import save

from coordinator.daemon import Coordinator
from coordinator.rounds import RoundOutcome, RoundPlan
from fedge.harness.federation import Federation, federation
from protocol.chunks import CHUNK_HEADER_BYTES, split_blob
from protocol.errors import FedgeError
from protocol.messages.agent import AgentState, AgentStatus, Capabilities, ErrorEvent
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.rounds import RoundAnnouncement, RoundConfig, UpdateComplete, UpdateEncoding
from protocol.signing import SignedMessage, SigningKey, VerifyKey, load_verify_key
from protocol.tensors import Encoding
from protocol.topics import Topics
from protocol.updates import decode_update, decode_weights, encode_update
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

pytestmark = [pytest.mark.broker, pytest.mark.system]

NUM_AGENTS = 2
REAL_AGENTS = frozenset(f"agent-{index:02d}" for index in range(NUM_AGENTS))
FIRST_ROUND_DEADLINE_S = 90.0
BAD_ROUND_DEADLINE_S = 20.0
GENUINE_ROUND_DEADLINE_S = 60.0
# Real one-epoch deltas on the digits model have norms near 1; 1e6 per value is far above.
MAX_UPDATE_NORM = 10.0
ABSURD_DELTA = 1e6
PLAN_JOIN_TIMEOUT_S = 240.0
EVENT_TIMEOUT_S = 60.0
AGENT_STATUS_TIMEOUT_S = 30.0
FAKE_ROUND_OFFSET = 1000

# Impostor ids: each gets a round slot of its own, since the coordinator keys updates by
# (round, agent) and ignores a second completion for the same key.
WRONG_SHAPE = "mallory-shape"
NAN_VALUES = "mallory-nan"
ABSURD_NORM = "mallory-norm"
REPLAY_OLD_ROUND = "mallory-replay-round"
REPLAY_OLD_BASE = "mallory-replay-base"
HASH_WRONG_BLOB = "mallory-hash"
HASH_FORGED_CHUNKS = "mallory-forged-chunks"
IMPOSTORS = (
    WRONG_SHAPE,
    NAN_VALUES,
    ABSURD_NORM,
    REPLAY_OLD_ROUND,
    REPLAY_OLD_BASE,
    HASH_WRONG_BLOB,
    HASH_FORGED_CHUNKS,
)
NOT_SELECTED = "stranger"


# --- federation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_topics() -> Topics:
    return Topics(root=f"t-bad-input-{uuid.uuid4().hex[:8]}", fleet="test")


@pytest.fixture(scope="module")
def fed(
    mosquitto: MosquittoProcess, module_topics: Topics, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("bad-input")
    with federation(root, mosquitto, module_topics, num_agents=NUM_AGENTS) as running:
        running.start_coordinator()
        running.wait_for_agents(NUM_AGENTS)
        yield running


def _coordinator(fed: Federation) -> Coordinator:
    assert fed.coordinator is not None
    return fed.coordinator


def _verify_key(fed: Federation) -> VerifyKey:
    assert fed.key_paths is not None
    return load_verify_key(fed.key_paths[1])


@dataclass
class PlanThread:
    """``run_plan_now`` in a background thread, so the test can act while the round runs."""

    coordinator: Coordinator
    plan: RoundPlan
    outcomes: list[RoundOutcome] = field(default_factory=list)
    failure: BaseException | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="test-plan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.outcomes = self.coordinator.run_plan_now(self.plan)
        except BaseException as exc:  # handed to the test thread by join()
            self.failure = exc

    def join(self, timeout_s: float = PLAN_JOIN_TIMEOUT_S) -> list[RoundOutcome]:
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the plan did not finish within {timeout_s:.0f} s")
        if self.failure is not None:
            raise AssertionError(f"the plan failed: {self.failure!r}") from self.failure
        return self.outcomes


# --- wire helpers ----------------------------------------------------------------------


def _announcements(messages: list[Received], key: VerifyKey) -> list[RoundAnnouncement]:
    found = []
    for message in messages:
        if not message.payload:
            continue
        try:
            signed = decode_message(message.payload, SignedMessage)
            found.append(decode_message(key.verify(signed), RoundAnnouncement))
        except FedgeError:
            continue  # forged announcements of the signature test are not the coordinator's
    return found


def _error_events(messages: list[Received], topic: str) -> list[ErrorEvent]:
    events = []
    for message in messages:
        if message.topic != topic:
            continue
        try:
            events.append(decode_message(message.payload, ErrorEvent))
        except FedgeError:
            continue  # command acks share the events topic
    return events


def _publish_status(client: mqtt.Client, topics: Topics, agent: str, state: AgentState) -> None:
    status = AgentStatus(
        agent=agent,
        state=state,
        timestamp=time.time(),
        capabilities=Capabilities(runtime="impostor", can_train=True, trainers=("litert",)),
    )
    publish(client, topics.agent_status(agent), encode_message(status), retain=True)


def _send_update(
    client: mqtt.Client,
    topics: Topics,
    *,
    slot: tuple[int, str],
    chunks: list[bytes],
    complete: UpdateComplete,
) -> None:
    """Chunks and a completion on the update topics of ``slot`` = (round, agent)."""
    round_number, agent = slot
    for index, chunk in enumerate(chunks):
        publish(client, topics.update_chunk(round_number, agent, index), chunk)
    publish(client, topics.update_manifest(round_number, agent), encode_message(complete))


def _completion(
    blob: bytes, *, round_number: int, agent: str, base_version: str
) -> tuple[UpdateComplete, list[bytes]]:
    """What a real agent sends for ``blob`` (see agent.federated)."""
    manifest, chunks = split_blob(blob)
    complete = UpdateComplete(
        round=round_number,
        agent=agent,
        base_model_version=base_version,
        update_sha256=manifest.sha256,
        update_size_bytes=manifest.size_bytes,
        chunk_count=manifest.chunk_count,
        chunk_bytes=manifest.chunk_bytes,
        encoding=UpdateEncoding.FLOAT32,
        num_examples=100,
    )
    return complete, chunks


def _nan_update(base: list[np.ndarray]) -> bytes:
    """An update in the codec's format holding a NaN; the codec refuses to encode one."""
    tensors = {f"d{i}": np.zeros(w.shape, np.float32) for i, w in enumerate(base)}
    tensors["d0"].flat[0] = np.nan
    metadata = {"fedge.format": "tensors", "fedge.format_version": "1"}
    metadata |= {f"fedge.encoding.{name}": "float32" for name in tensors}
    blob: bytes = save(tensors, metadata=metadata)
    return blob


def _chunks_claiming(blob: bytes, claimed: bytes) -> list[bytes]:
    """``blob``'s chunks with headers that name ``claimed`` (same size) as their blob.

    Each chunk's own crc32 is right, so only the sha256 of the reassembled whole can tell.
    """
    assert len(blob) == len(claimed)
    _, real = split_blob(blob)
    _, decoy = split_blob(claimed)
    forged = []
    for real_chunk, decoy_chunk in zip(real, decoy, strict=True):
        data = real_chunk[CHUNK_HEADER_BYTES:]
        header = decoy_chunk[: CHUNK_HEADER_BYTES - 4] + zlib.crc32(data).to_bytes(4, "big")
        forged.append(header + data)
    return forged


# --- the round with bad updates --------------------------------------------------------


@dataclass(frozen=True)
class BadRound:
    round: int
    outcome: RoundOutcome
    selected: tuple[str, ...]
    stored: set[str]
    events_topic: str
    collector: MessageCollector
    real_update_norms: dict[str, float]

    def events_about(self, agent: str) -> list[ErrorEvent]:
        events = _error_events(self.collector.messages, self.events_topic)
        return [event for event in events if agent in event.message]

    def wait_for_event(self, agent: str, reason: str) -> None:
        """Refusals go out while the round is open; delivery to the test may lag a little."""
        self.collector.wait_for(
            lambda _: reason in {event.reason for event in self.events_about(agent)},
            EVENT_TIMEOUT_S,
        )


@dataclass(frozen=True)
class Case:
    agent: str
    reason: str
    detail: str = ""  # also in the event's message


CASES = {
    "wrong_shapes": Case(WRONG_SHAPE, "wrong_shape"),
    "nan_values": Case(NAN_VALUES, "non_finite"),
    "absurd_norm": Case(ABSURD_NORM, "norm_too_large", "exceeds max_norm 10"),
    "replay_naming_the_earlier_round": Case(REPLAY_OLD_ROUND, "wrong_topic"),
    "replay_from_the_earlier_base": Case(REPLAY_OLD_BASE, "wrong_base"),
    "agent_not_selected": Case(NOT_SELECTED, "not_selected"),
    "completion_hash_not_the_chunks": Case(HASH_WRONG_BLOB, "wrong_blob"),
    "chunks_forged_for_the_completion_hash": Case(HASH_FORGED_CHUNKS, "hash_mismatch"),
}


def _bad_updates(
    base: list[np.ndarray], announcement: RoundAnnouncement, earlier: tuple[bytes, UpdateComplete]
) -> dict[str, tuple[UpdateComplete, list[bytes]]]:
    """Every misbehaving agent's chunks and completion for ``announcement``'s round."""
    number = announcement.round
    version = announcement.release.version
    zeros = [np.zeros(w.shape, np.float32) for w in base]

    def made(deltas: list[np.ndarray], agent: str) -> tuple[UpdateComplete, list[bytes]]:
        blob = encode_update(deltas, encoding=Encoding.FLOAT32)
        return _completion(blob, round_number=number, agent=agent, base_version=version)

    wrong_shapes = [np.zeros((*w.shape, 2), np.float32) for w in base]
    absurd = [np.full(w.shape, ABSURD_DELTA, np.float32) for w in base]
    nan_blob = _nan_update(base)
    valid_blob = encode_update(zeros, encoding=Encoding.FLOAT32)
    decoy = bytearray(valid_blob)
    decoy[-1] ^= 0xFF  # same size, another sha256
    old_payload, old_complete = earlier
    _, old_chunks = split_blob(old_payload)
    hash_complete, hash_chunks = made(zeros, HASH_WRONG_BLOB)
    forged_complete, _ = _completion(
        bytes(decoy), round_number=number, agent=HASH_FORGED_CHUNKS, base_version=version
    )
    return {
        WRONG_SHAPE: made(wrong_shapes, WRONG_SHAPE),
        NAN_VALUES: _completion(
            nan_blob, round_number=number, agent=NAN_VALUES, base_version=version
        ),
        ABSURD_NORM: made(absurd, ABSURD_NORM),
        # A real agent's update of the earlier round, sent again in this one.
        REPLAY_OLD_ROUND: (old_complete.model_copy(update={"agent": REPLAY_OLD_ROUND}), old_chunks),
        REPLAY_OLD_BASE: (
            old_complete.model_copy(update={"agent": REPLAY_OLD_BASE, "round": number}),
            old_chunks,
        ),
        NOT_SELECTED: made(zeros, NOT_SELECTED),
        HASH_WRONG_BLOB: (
            hash_complete.model_copy(
                update={"update_sha256": hashlib.sha256(bytes(decoy)).hexdigest()}
            ),
            hash_chunks,
        ),
        HASH_FORGED_CHUNKS: (forged_complete, _chunks_claiming(valid_blob, bytes(decoy))),
    }


def _earlier_real_update(
    fed: Federation, client: mqtt.Client, collector: MessageCollector
) -> tuple[int, bytes, UpdateComplete]:
    """Run one genuine round and capture agent-00's update (payload and completion)."""
    coordinator = _coordinator(fed)
    topics = fed.topics
    number = coordinator.state.last_round_number() + 1
    subscribe(client, topics.round_updates(number))
    outcomes = coordinator.run_plan_now(
        RoundPlan(rounds=1, min_agents=NUM_AGENTS, deadline_s=FIRST_ROUND_DEADLINE_S)
    )
    assert [o.ok for o in outcomes] == [True], [o.reason for o in outcomes]
    agent = "agent-00"
    manifest_topic = topics.update_manifest(number, agent)
    collector.wait_for_topic(manifest_topic, timeout_s=EVENT_TIMEOUT_S)
    complete = decode_message(collector.on_topic(manifest_topic)[-1].payload, UpdateComplete)
    stored = coordinator.state.update(number, agent)
    assert stored is not None
    assert hashlib.sha256(stored.payload).hexdigest() == complete.update_sha256
    return number, stored.payload, complete


@pytest.fixture(scope="module")
def bad_round(fed: Federation) -> Iterator[BadRound]:
    coordinator = _coordinator(fed)
    topics = fed.topics
    key = _verify_key(fed)
    collector = MessageCollector()
    client = mqtt_client(fed.broker, collector=collector)
    try:
        _, earlier_payload, earlier_complete = _earlier_real_update(fed, client, collector)
        subscribe(client, topics.coordinator_events())
        subscribe(client, topics.round_current())
        for impostor in IMPOSTORS:
            _publish_status(client, topics, impostor, AgentState.ONLINE)
        fed.wait_for_agents(NUM_AGENTS + len(IMPOSTORS))
        number = coordinator.state.last_round_number() + 1
        runner = PlanThread(
            coordinator,
            RoundPlan(
                rounds=1,
                min_agents=NUM_AGENTS,
                deadline_s=BAD_ROUND_DEADLINE_S,
                max_update_norm=MAX_UPDATE_NORM,
            ),
        )
        runner.start()
        collector.wait_for(
            lambda msgs: any(a.round == number for a in _announcements(msgs, key)),
            EVENT_TIMEOUT_S,
        )
        announcement = next(a for a in _announcements(collector.messages, key) if a.round == number)
        base = decode_weights(coordinator.state.blob(announcement.release.weights.sha256))
        updates = _bad_updates(base, announcement, (earlier_payload, earlier_complete))
        for agent, (complete, chunks) in updates.items():
            _send_update(client, topics, slot=(number, agent), chunks=chunks, complete=complete)
        (outcome,) = runner.join()
        stored = coordinator.state.update_agents(number)
        norms = {}
        for agent in stored & REAL_AGENTS:
            update = coordinator.state.update(number, agent)
            assert update is not None
            deltas = decode_update(update.payload)
            norms[agent] = float(np.sqrt(sum(float(np.sum(np.square(d))) for d in deltas)))
        yield BadRound(
            round=number,
            outcome=outcome,
            selected=announcement.selected,
            stored=stored,
            events_topic=topics.coordinator_events(),
            collector=collector,
            real_update_norms=norms,
        )
    finally:
        for impostor in IMPOSTORS:
            _publish_status(client, topics, impostor, AgentState.OFFLINE)
        _wait_offline(coordinator, IMPOSTORS)
        for impostor in IMPOSTORS:
            publish(client, topics.agent_status(impostor), b"", retain=True)
        disconnect(client)


def _wait_offline(coordinator: Coordinator, agents: tuple[str, ...]) -> None:
    def offline() -> bool:
        known = coordinator.fleet.agents()
        return all(a not in known or not known[a].online for a in agents)

    wait_until(offline, AGENT_STATUS_TIMEOUT_S, what=f"{agents} to be offline")


def test_the_round_selects_every_impostor_but_not_the_stranger(bad_round: BadRound) -> None:
    assert set(bad_round.selected) == REAL_AGENTS | set(IMPOSTORS)
    assert NOT_SELECTED not in bad_round.selected


def test_the_round_completes_with_the_real_agents_updates_only(bad_round: BadRound) -> None:
    assert bad_round.outcome.ok, bad_round.outcome.reason
    assert bad_round.stored == REAL_AGENTS
    assert bad_round.outcome.metrics["updates"] == NUM_AGENTS
    # The real updates passed the same norm bound that refused the absurd one.
    assert all(norm <= MAX_UPDATE_NORM for norm in bad_round.real_update_norms.values())


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_update_is_refused_with_an_error_event_naming_the_reason(
    case: Case, bad_round: BadRound
) -> None:
    try:
        bad_round.wait_for_event(case.agent, case.reason)
    except AssertionError as exc:
        events = [(e.reason, e.message) for e in bad_round.events_about(case.agent)]
        raise AssertionError(f"no {case.reason!r} event for {case.agent}: {events}") from exc
    messages = [e.message for e in bad_round.events_about(case.agent) if e.reason == case.reason]
    assert any(case.detail in message for message in messages), messages
    assert case.agent not in bad_round.stored


# --- forged round announcements --------------------------------------------------------


def _forged(body: str) -> bytes:
    return encode_message(SigningKey.generate().sign(body))


def _unsigned(body: str) -> bytes:
    return body.encode("utf-8")


def _tampered(signed: SignedMessage, body: str) -> bytes:
    return encode_message(signed.model_copy(update={"body": body}))


def test_agents_refuse_forged_unsigned_and_tampered_announcements(fed: Federation) -> None:
    coordinator = _coordinator(fed)
    topics = fed.topics
    key = _verify_key(fed)
    collector = MessageCollector()
    client = mqtt_client(fed.broker, collector=collector)
    try:
        fake_round = coordinator.state.last_round_number() + FAKE_ROUND_OFFSET
        now = time.time()
        fake = RoundAnnouncement(
            round=fake_round,
            release=coordinator.runner.current_release(),
            selected=tuple(sorted(REAL_AGENTS)),
            config=RoundConfig(),
            deadline_at=now + GENUINE_ROUND_DEADLINE_S,
            issued_at=now,
        )
        body = fake.model_dump_json()
        # The coordinator's own signature over an announcement that selects nobody.
        signed = coordinator.signing_key.sign(
            fake.model_copy(update={"selected": ()}).model_dump_json()
        )
        assert key.verify(signed)
        subscribe(client, topics.round_updates(fake_round))
        subscribe(client, topics.all_agent_events())
        attempts: list[tuple[str, bytes, set[str]]] = [
            ("forged", _forged(body), {"unknown_key"}),
            ("unsigned", _unsigned(body), {"unexpected_kind", "invalid"}),
            ("tampered", _tampered(signed, body), {"bad_signature"}),
        ]
        for what, payload, reasons in attempts:
            publish(client, topics.round_current(), payload, retain=True)
            _wait_for_agent_errors(collector, topics, reasons, what)
        number = coordinator.state.last_round_number() + 1
        outcomes = coordinator.run_plan_now(
            RoundPlan(rounds=1, min_agents=NUM_AGENTS, deadline_s=GENUINE_ROUND_DEADLINE_S)
        )
        assert [o.ok for o in outcomes] == [True], [o.reason for o in outcomes]
        assert coordinator.state.update_agents(number) == REAL_AGENTS
        # Each agent handles announcements in order, so had it taken a fake one, its update
        # for the fake round would have gone out before its update for the genuine round.
        fake_updates = topics.round_updates(fake_round).removesuffix("#")
        assert not [m.topic for m in collector.messages if m.topic.startswith(fake_updates)]
        for agent in fed.agents:
            assert "Traceback" not in agent.log()
    finally:
        disconnect(client)


def _wait_for_agent_errors(
    collector: MessageCollector, topics: Topics, reasons: set[str], what: str
) -> None:
    def refused_by(agent: str) -> Callable[[list[Received]], bool]:
        def check(messages: list[Received]) -> bool:
            events = _error_events(messages, topics.agent_events(agent))
            return any(e.reason in reasons and topics.round_current() in e.message for e in events)

        return check

    for agent in sorted(REAL_AGENTS):
        try:
            collector.wait_for(refused_by(agent), EVENT_TIMEOUT_S)
        except AssertionError as exc:
            events = _error_events(collector.messages, topics.agent_events(agent))
            raise AssertionError(
                f"{agent} did not refuse the {what} announcement with {reasons}: "
                f"{[(e.reason, e.message) for e in events]}"
            ) from exc
